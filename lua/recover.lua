--[[
  recover: reclaim expired leases (their worker died, stalled or lost Redis), a bounded batch,
  as failed attempts. Safe to run from many servers at once: the expiry is checked and the
  task moved in this one script. Called by Queue.recover.

  KEYS[1] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)
  KEYS[2] -> {<prefix>:<queue>}:retry        zset, failed ids scored by next attempt (ms)
  KEYS[3] -> {<prefix>:<queue>}:archived     zset, dead ids scored by archive time (ms)
  KEYS[4] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)

  ARGV[1] -> the most leases to reclaim (1..10000)
  ARGV[2] -> max recoveries: a task recovered this many times is archived as poison
  ARGV[3] -> retry delay (ms) for a task with no retry_delay of its own

  Derived keys: KEYS[4] .. id (the task hash) and its "unique" field (its lock); same hash tag.

  Returns:
    {n_retry, n_archived, n_orphan, next_expiry_ms}: next_expiry_ms is the earliest lease
    expiry still in active (-1 when none), so a caller can sleep until then.
    An expired id whose hash is gone (or is not a hash) is dropped and counted as an orphan.
    {-5, key} when a container key holds another Redis type; nothing written.

  State change: active -> retry (retried + 1, recoveries + 1, error "lease expired"), or
  active -> archived when retries are exhausted, the deadline passed, or the task was recovered
  max-recoveries times (poison). The token is removed, so the old holder can no longer commit.
  Invariants: retried <= max_retry; a recovered id is in exactly one container.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/archive"
local rcall = redis.call
local active_key, retry_key, archived_key, task_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local limit, max_recoveries, default_delay = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local wrong = first_wrong_type({active_key, "zset", retry_key, "zset", archived_key, "zset"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local n_retry, n_archived, n_orphan = 0, 0, 0
local ids = rcall("ZRANGEBYSCORE", active_key, "-inf", now, "LIMIT", 0, limit)
for _, id in ipairs(ids) do
  local task_key = task_prefix .. id
  rcall("ZREM", active_key, id)
  if key_type(task_key) ~= "hash" then
    n_orphan = n_orphan + 1
  else
    local f = rcall("HMGET", task_key, "r", "m", "recoveries", "deadline", "unique", "retry_delay")
    local retried, max_retry = tonumber(f[1]) or 0, tonumber(f[2]) or 0
    local recoveries = (tonumber(f[3]) or 0) + 1
    local deadline = tonumber(f[4] or "0") or 0
    local delay = tonumber(f[6] or "-1") or -1
    if delay < 0 then
      delay = default_delay
    end
    rcall("HSET", task_key, "recoveries", recoveries, "failed_at", now)
    if recoveries >= max_recoveries then
      -- At most 64 bytes, as every value qsync writes: a longer one turns the hash into a hash table.
      archive_task(task_key, id, archived_key, now,
        "poison: lease expired " .. recoveries .. " times (it may be killing its worker)", f[5])
      n_archived = n_archived + 1
    elseif retried >= max_retry then
      archive_task(task_key, id, archived_key, now, "lease expired", f[5])
      n_archived = n_archived + 1
    elseif deadline > 0 and now + delay >= deadline then
      archive_task(task_key, id, archived_key, now, "lease expired; deadline exceeded", f[5])
      n_archived = n_archived + 1
    else
      rcall("HSET", task_key, "s", "retry", "error", "lease expired", "r", retried + 1)
      rcall("HDEL", task_key, "token")
      rcall("ZADD", retry_key, now + delay, id)
      n_retry = n_retry + 1
    end
  end
end
local head = rcall("ZRANGE", active_key, 0, 0, "WITHSCORES")
local next_expiry = head[2] and tonumber(head[2]) or -1
return {n_retry, n_archived, n_orphan, next_expiry}
