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

-- active_scores: for a batch of ids, each one's score in active (false when it is not there), read
-- with one ZMSCORE per 1,000 ids instead of one ZSCORE per id. A batch transition that checks the
-- token itself (one read of the hash per task) uses this for the other half of holds_lease.
local function active_scores(active_key, ids)
  local scores = {}
  for first = 1, #ids, 1000 do
    local part = redis.call("ZMSCORE", active_key, unpack(ids, first, math.min(first + 999, #ids)))
    for j = 1, #part do
      scores[first + j - 1] = part[j]
    end
  end
  return scores
end
