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
local ids = {}
for i = 1, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end

-- Read first: which leases are held (holds_lease, batched: one read of each hash gives its token
-- and what finishing needs; active is checked for the whole batch at once).
local scores = active_scores(active_key, ids)
local reply, held, task_keys, retentions, locks, n_held = {}, {}, {}, {}, {}, 0
for i = 1, #ids do
  local id = ids[i]
  local task_key = task_prefix .. id
  -- pcall: a task key of another type reads as an error table: not held. Retention and the
  -- unique lock are read only when "o" says the task has one, or for a task of format 1
  -- (written before "o" existed): naming a field the hash lacks costs a scan of the hash.
  local f = scores[i] and not held[id] and redis.pcall("HMGET", task_key, "token", "v", "o")
  if f and not f.err and f[1] == ARGV[2 * i] then
    held[id] = true  -- the same lease twice in one batch finishes once; the second is lost
    local retention, lock = 0, nil
    if (f[2] ~= "2" and f[2] ~= "3") or (f[3] and f[3] ~= "1") then
      local o = rcall("HMGET", task_key, "retention", "unique")
      retention, lock = o[1] and tonumber(o[1]) or 0, o[2]
    end
    -- Indexed by the count of held tasks: lock is nil for a task without one, and
    -- "t[#t + 1] = nil" would append nothing and shift the locks of the tasks after it.
    n_held = n_held + 1
    task_keys[n_held], locks[n_held], retentions[n_held] = task_key, lock, retention
    reply[i] = 0  -- filled in below
  else
    reply[i] = -3
  end
end

-- Then write: one ZREM for the batch's held ids and one DEL for the hashes not kept (per 1,000).
local done, deleted, k = {}, {}, 0
for i = 1, #ids do
  if reply[i] == 0 then
    k = k + 1
    local id, task_key, retention = ids[i], task_keys[k], retentions[k]
    done[#done + 1] = id
    if locks[k] then
      release_unique(locks[k], id)
    end
    if retention > 0 then
      rcall("HSET", task_key, "s", "completed", "done_at", now)
      rcall("HDEL", task_key, "token")
      rcall("PEXPIRE", task_key, retention)
      rcall("ZADD", completed_key, now + retention, id)
      reply[i] = 2
    else
      deleted[#deleted + 1] = task_key
      reply[i] = 1
    end
  end
end
for first = 1, #done, 1000 do
  rcall("ZREM", active_key, unpack(done, first, math.min(first + 999, #done)))
end
for first = 1, #deleted, 1000 do
  rcall("DEL", unpack(deleted, first, math.min(first + 999, #deleted)))
end
return reply
