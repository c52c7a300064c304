-- holds_lease: true when the task is in active and its hash carries this lease token. Every
-- lease-holding transition (extend, ack, fail, requeue) checks it first and writes nothing
-- when it is false: a worker whose lease was recovered and handed to another cannot commit.
-- pcall: a task key of another Redis type reads as "not held", never as an error after a write.
local function holds_lease(active_key, task_key, task_id, token)
  local current = redis.pcall("HGET", task_key, "token")
  if current ~= token then
    return false
  end
  return redis.call("ZSCORE", active_key, task_id) ~= false
end
