-- @include "lib/unique"
-- archive_task: make a task dead with a reason. The caller has already removed the id from the
-- container it was in; the hash keeps every field (payload, attempts) for inspection and re-run.
local function archive_task(task_key, task_id, archived_key, now, reason, lock_key)
  redis.call("HSET", task_key, "s", "archived", "error", reason, "done_at", now)
  redis.call("HDEL", task_key, "token")
  redis.call("ZADD", archived_key, now, task_id)
  release_unique(lock_key, task_id)
end
