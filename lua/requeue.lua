--[[
  requeue: hand leased tasks back to the front of pending without counting an attempt (graceful
  shutdown: the worker stops before the task could finish). Called by Queue.requeue.

  KEYS[1] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)
  KEYS[2] -> {<prefix>:<queue>}:pending      list, ids ready to run (RPUSH: next to be leased)
  KEYS[3] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)
  KEYS[4] -> {<prefix>:<queue>}:wake         list, wake-up token for idle workers (lib/wake)

  ARGV[1..] -> pairs: task id, lease token

  Derived keys: KEYS[3] .. id, the task hash (same hash tag).

  Returns:
    {code_1, ..., code_n}: 1 back in pending, -3 LEASE_LOST (nothing written for it).
    {-5, key} when active or pending holds another Redis type; nothing written.

  State change: active -> pending (retried unchanged, unique lock kept); a wake-up token.
  Invariants: the requeued id is only in pending; its old token can no longer commit.
]]
-- @include "lib/types"
-- @include "lib/fence"
-- @include "lib/wake"
local rcall = redis.call
local active_key, pending_key, task_prefix, wake_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local requeued = false

local wrong = first_wrong_type({active_key, "zset", pending_key, "list", wake_key, "list"})
if wrong then
  return {-5, wrong}
end

local reply = {}
for i = 1, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local task_key = task_prefix .. id
  if holds_lease(active_key, task_key, id, token) then
    rcall("ZREM", active_key, id)
    rcall("HSET", task_key, "s", "pending")
    rcall("HDEL", task_key, "token")
    rcall("RPUSH", pending_key, id)
    requeued = true
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = -3
  end
end
if requeued then
  wake(wake_key)
end
return reply
