-- release_unique: delete a task's unique lock, but only while the lock still names this task
-- (after its TTL ran out another task may own it). pcall: a foreign key of another type is left alone.
local function release_unique(lock_key, task_id)
  if lock_key and lock_key ~= "" then
    if redis.pcall("GET", lock_key) == task_id then
      redis.call("DEL", lock_key)
    end
  end
end
