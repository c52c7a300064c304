--[[
  ack: finish a batch of leased tasks that succeeded: delete each, or keep it as completed for
  its retention; release its unique lock. Called by Queue.ack (qsync/_ops.py ack).

  KEYS[1] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)
  KEYS[2] -> {<prefix>:<queue>}:completed    zset, retained ids scored by when they expire (ms)
  KEYS[3] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)

  ARGV[1..] -> pairs: task id, lease token

  Derived keys: KEYS[3] .. id (the task hash) and its "unique" field (its lock); same hash tag.

  Returns:
    {code_1, ..., code_n}: 1 done and deleted, 2 done and kept as completed,
    -3 LEASE_LOST (token stale, task recovered, finished or gone: nothing written for it).
    {-5, key} when active or completed holds another Redis type; nothing written.

  State change: active -> (deleted), or active -> completed (hash expires with its retention).
  Invariants: a finished task holds no unique lock; a retained task is only in completed.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/fence"
-- @include "lib/unique"
local rcall = redis.call
local active_key, completed_key, task_prefix = KEYS[1], KEYS[2], KEYS[3]

local wrong = first_wrong_type({active_key, "zset", completed_key, "zset"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local reply = {}
for i = 1, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local task_key = task_prefix .. id
  if holds_lease(active_key, task_key, id, token) then
    local f = rcall("HMGET", task_key, "retention", "unique")
    local retention = tonumber(f[1] or "0") or 0
    rcall("ZREM", active_key, id)
    release_unique(f[2], id)
    if retention > 0 then
      rcall("HSET", task_key, "s", "completed", "done_at", now)
      rcall("HDEL", task_key, "token")
      rcall("PEXPIRE", task_key, retention)
      rcall("ZADD", completed_key, now + retention, id)
      reply[#reply + 1] = 2
    else
      rcall("DEL", task_key)
      reply[#reply + 1] = 1
    end
  else
    reply[#reply + 1] = -3
  end
end
return reply
