--[[
  promote: move due tasks from scheduled and from retry to pending, by server time, a bounded
  batch from each. Safe to run from many servers at once. Called by Queue.promote.

  KEYS[1] -> {<prefix>:<queue>}:scheduled    zset, delayed ids scored by due time (ms)
  KEYS[2] -> {<prefix>:<queue>}:retry        zset, failed ids scored by next attempt (ms)
  KEYS[3] -> {<prefix>:<queue>}:pending      list, ids ready to run (LPUSH: behind the others)
  KEYS[4] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)
  KEYS[5] -> {<prefix>:<queue>}:wake         list, wake-up token for idle workers (lib/wake)

  ARGV[1] -> the most ids to move from each of scheduled and retry (1..10000)

  Derived keys: KEYS[4] .. id, the task hash (same hash tag).

  Returns:
    {n_promoted, n_orphan, next_due_ms}: next_due_ms is the earliest due time still waiting in
    scheduled or retry (-1 when both are empty), so a caller can sleep until then.
    An id whose hash is gone (or is not a hash) is dropped and counted as an orphan.
    {-5, key} when a container key holds another Redis type; nothing written.

  State change: scheduled -> pending, retry -> pending; a wake-up token when any moved.
  Invariants: a promoted id is only in pending, with state "pending"; nothing is promoted early.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/wake"
local rcall = redis.call
local scheduled_key, retry_key, pending_key, task_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local wake_key = KEYS[5]
local limit = tonumber(ARGV[1])

local wrong = first_wrong_type({scheduled_key, "zset", retry_key, "zset", pending_key, "list",
                                 wake_key, "list"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local promoted, orphans = 0, 0
local next_due = -1
for _, source in ipairs({scheduled_key, retry_key}) do
  local ids = rcall("ZRANGEBYSCORE", source, "-inf", now, "LIMIT", 0, limit)
  -- One ZREM and one LPUSH per 1,000 ids rather than one of each per task (same order in
  -- pending as one LPUSH per task): a call from Lua costs more than its command.
  local ready = {}
  for _, id in ipairs(ids) do
    local task_key = task_prefix .. id
    if key_type(task_key) == "hash" then
      rcall("HSET", task_key, "s", "pending")
      ready[#ready + 1] = id
    else
      orphans = orphans + 1
    end
  end
  for first = 1, #ids, 1000 do
    local last = math.min(first + 999, #ids)
    rcall("ZREM", source, unpack(ids, first, last))
  end
  for first = 1, #ready, 1000 do
    rcall("LPUSH", pending_key, unpack(ready, first, math.min(first + 999, #ready)))
  end
  promoted = promoted + #ready
  local head = rcall("ZRANGE", source, 0, 0, "WITHSCORES")
  if head[2] then
    local due = tonumber(head[2])
    if next_due < 0 or due < next_due then
      next_due = due
    end
  end
end
if promoted > 0 then
  wake(wake_key)
end
return {promoted, orphans, next_due}
