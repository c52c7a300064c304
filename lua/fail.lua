--[[
  fail: record a failed attempt for a batch of leased tasks: each goes to retry at now + its
  delay, or to archived when it may not retry. Called by Queue.fail (qsync/_ops.py fail).

  KEYS[1] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)
  KEYS[2] -> {<prefix>:<queue>}:retry        zset, failed ids scored by next attempt (ms)
  KEYS[3] -> {<prefix>:<queue>}:archived     zset, dead ids scored by archive time (ms)
  KEYS[4] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)

  ARGV[1..] -> 4 fields per task: task id, lease token, error text, retry delay (ms; -1: do not
               retry, archive now, as for qsync.SkipRetry)

  Derived keys: KEYS[4] .. id (the task hash) and its "unique" field (its lock); same hash tag.

  Returns:
    {now_ms, code_1, ..., code_n}: 1 to retry (retried + 1), 2 archived (retries exhausted,
    SkipRetry, or the next attempt would start past the deadline; retried unchanged),
    -3 LEASE_LOST (token stale, task recovered, finished or gone: nothing written for it).
    {-5, key} when a container key holds another Redis type; nothing written.

  State change: active -> retry, or active -> archived (unique lock released).
  Invariants: retried <= max_retry; the error text is kept in the hash's "error" field.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/fence"
-- @include "lib/archive"
local rcall = redis.call
local active_key, retry_key, archived_key, task_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local wrong = first_wrong_type({active_key, "zset", retry_key, "zset", archived_key, "zset"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local reply = {now}
for i = 1, #ARGV, 4 do
  local id, token, err, delay = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local task_key = task_prefix .. id
  if holds_lease(active_key, task_key, id, token) then
    local f = rcall("HMGET", task_key, "r", "m", "deadline", "unique")
    local retried, max_retry = tonumber(f[1]) or 0, tonumber(f[2]) or 0
    local deadline = tonumber(f[3] or "0") or 0
    rcall("ZREM", active_key, id)
    if delay < 0 or retried >= max_retry or (deadline > 0 and now + delay >= deadline) then
      archive_task(task_key, id, archived_key, now, err, f[4])
      rcall("HSET", task_key, "failed_at", now)
      reply[#reply + 1] = 2
    else
      rcall("HSET", task_key, "s", "retry", "error", err, "failed_at", now, "r", retried + 1)
      rcall("HDEL", task_key, "token")
      rcall("ZADD", retry_key, now + delay, id)
      reply[#reply + 1] = 1
    end
  else
    reply[#reply + 1] = -3
  end
end
return reply
