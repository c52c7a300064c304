--[[
  trim: forget finished tasks past their keep: completed tasks whose retention ended, and
  archived tasks older than a max age or beyond a max count (oldest first). Bounded batch.
  Called by Queue.trim (the server's janitor).

  KEYS[1] -> {<prefix>:<queue>}:completed    zset, retained ids scored by when they expire (ms)
  KEYS[2] -> {<prefix>:<queue>}:archived     zset, dead ids scored by archive time (ms)
  KEYS[3] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)

  ARGV[1] -> the most ids to remove from each zset (1..10000)
  ARGV[2] -> archived max age (ms)
  ARGV[3] -> archived max count

  Derived keys: KEYS[3] .. id, the task hash (same hash tag).

  Returns:
    {n_completed_removed, n_archived_removed}
    {-5, key} when completed or archived holds another Redis type; nothing written.

  State change: completed -> (deleted), archived -> (deleted). A hash is deleted only while its
  state still names the zset it is removed from (an id re-enqueued since keeps its new task).
]]
-- @include "lib/now"
-- @include "lib/types"
local rcall = redis.call
local completed_key, archived_key, task_prefix = KEYS[1], KEYS[2], KEYS[3]
local limit, max_age, max_count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local wrong = first_wrong_type({completed_key, "zset", archived_key, "zset"})
if wrong then
  return {-5, wrong}
end

local function forget(zset_key, ids, state)
  for _, id in ipairs(ids) do
    local task_key = task_prefix .. id
    rcall("ZREM", zset_key, id)
    if redis.pcall("HGET", task_key, "s") == state then
      rcall("DEL", task_key)
    end
  end
  return #ids
end

local now = now_ms()
local n_completed = forget(completed_key, rcall("ZRANGEBYSCORE", completed_key, "-inf", now, "LIMIT", 0, limit), "completed")
local n_archived = forget(archived_key, rcall("ZRANGEBYSCORE", archived_key, "-inf", now - max_age, "LIMIT", 0, limit), "archived")
local excess = rcall("ZCARD", archived_key) - max_count
if excess > 0 then
  n_archived = n_archived + forget(archived_key, rcall("ZRANGE", archived_key, 0, math.min(excess, limit) - 1), "archived")
end
return {n_completed, n_archived}
