--[[
  extend: heartbeat for a batch of leases: push each lease's expiry to now + duration, but only
  for leases still held. Called by Queue.extend (qsync/_ops.py extend).

  KEYS[1] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)
  KEYS[2] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)

  ARGV[1] -> lease duration (ms)
  ARGV[2..] -> pairs: task id, lease token

  Derived keys: KEYS[2] .. id, the task hash (same hash tag).

  Returns:
    {expires_ms, code_1, ..., code_n}: 1 extended, -3 LEASE_LOST (token stale, task recovered,
    finished or gone: nothing written for it).
    {-5, key} when active holds another Redis type; nothing written.

  State change: none (active stays active, with a later expiry).
  Invariants: only the current token holder moves an expiry.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/fence"
local active_key, task_prefix = KEYS[1], KEYS[2]

local wrong = first_wrong_type({active_key, "zset"})
if wrong then
  return {-5, wrong}
end

local expires = now_ms() + tonumber(ARGV[1])
local reply = {expires}
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if holds_lease(active_key, task_prefix .. id, id, token) then
    redis.call("ZADD", active_key, "XX", expires, id)
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = -3
  end
end
return reply
