--[[
  enqueue: put new tasks on one queue, ready now (pending) or at a later time (scheduled).
  Called by Queue.enqueue / Queue.enqueue_many (qsync/_ops.py enqueue_many).

  KEYS[1] -> {<prefix>:<queue>}:pending      list, ids ready to run (LPUSH in, RPOP out)
  KEYS[2] -> {<prefix>:<queue>}:scheduled    zset, ids scored by due time (ms)
  KEYS[3] -> {<prefix>:<queue>}:wake         list, wake-up token for idle workers (lib/wake)
  KEYS[4] -> {<prefix>:<queue>}:completed    zset, retained finished ids (a reused id leaves it)
  KEYS[5..] -> per task, referenced by index from ARGV:
               {<prefix>:<queue>}:t:<id>     hash, the task
               {<prefix>:<queue>}:u:<key>    string, a unique lock holding the owning id

  ARGV[1] -> n, the number of tasks; then 14 fields per task i, from ARGV[2 + (i-1)*14]:
    +0 id                 +1 index in KEYS of the task hash
    +2 index in KEYS of the unique lock (0: none)       +3 unique lock TTL (ms)
    +4 type               +5 payload (bytes)           +6 fingerprint of type, payload and options
    +7 max_retry          +8 timeout (ms, 0: none)     +9 deadline (ms since epoch, 0: none)
    +10 retention (ms, 0: delete when done)            +11 retry delay (ms, -1: the worker's policy)
    +12 delay (ms after server now, 0: none)           +13 process at (ms since epoch, 0: none)

  Returns:
    {now_ms, code_1, detail_1, ..., code_n, detail_n}, per task:
       1, state      enqueued, state is "pending" or "scheduled"
       2, state      EXISTS: the id is taken by a task with the same fingerprint (idempotent
                     success, e.g. a client retry after a lost reply); state is its current state
      -1, ""         CONFLICT: the id is taken by a task with other content
      -2, owner_id   DUPLICATE: the unique lock is held by another live task
      -5, key        WRONG_TYPE: the task or lock key holds another Redis type; nothing written
    {-5, key} when pending or scheduled holds another Redis type; nothing written at all.

  State change: (none) -> pending, or (none) -> scheduled; a wake-up token when any went pending. Every task is checked before it is
  written; an item that is refused writes nothing. Items are independent (per-item results).
  Invariants: a new id is in exactly one of pending/scheduled and its hash state names it;
  a unique lock exists only with the id of a live task.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/wake"
local rcall = redis.call
local pending_key = KEYS[1]
local scheduled_key = KEYS[2]
local wake_key, completed_key = KEYS[3], KEYS[4]
local n = tonumber(ARGV[1])
local STRIDE = 14

local wrong = first_wrong_type({pending_key, "list", scheduled_key, "zset", wake_key, "list",
                                 completed_key, "zset"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local reply = {now}
local ready = {}  -- ids going to pending, in order
-- A completed task's hash expires on its own (PEXPIRE) while its id waits in completed for trim;
-- an id reused after that expiry must leave completed, or it would be in two containers.
local has_completed = rcall("EXISTS", completed_key) == 1

for i = 1, n do
  local b = 2 + (i - 1) * STRIDE
  local id = ARGV[b]
  local task_key = KEYS[tonumber(ARGV[b + 1])]
  local lock_index = tonumber(ARGV[b + 2])
  local lock_key = lock_index > 0 and KEYS[lock_index] or nil
  local fingerprint = ARGV[b + 6]
  local code, detail = 1, ""

  local task_type = key_type(task_key)
  if task_type == "hash" then
    local existing = rcall("HMGET", task_key, "f", "s")
    if existing[1] == fingerprint then
      code, detail = 2, existing[2] or ""
    else
      code = -1
    end
  elseif task_type ~= "none" then
    code, detail = -5, task_key
  elseif lock_key then
    local lock_type = key_type(lock_key)
    if lock_type == "string" then
      local owner = rcall("GET", lock_key)
      if owner ~= id then
        code, detail = -2, owner
      end
    elseif lock_type ~= "none" then
      code, detail = -5, lock_key
    end
  end

  if code == 1 then
    local delay, at = tonumber(ARGV[b + 12]), tonumber(ARGV[b + 13])
    local due = now
    if at > 0 then
      due = at
    elseif delay > 0 then
      due = now + delay
    end
    local state = due > now and "scheduled" or "pending"
    -- Only non-default options are stored: the hash is most of a task's memory.
    rcall("HSET", task_key, "v", "1", "t", ARGV[b + 4], "p", ARGV[b + 5], "f", fingerprint,
          "s", state, "m", ARGV[b + 7], "r", "0", "c", now)
    local options = {}
    if ARGV[b + 8] ~= "0" then options[#options + 1] = "timeout"; options[#options + 1] = ARGV[b + 8] end
    if ARGV[b + 9] ~= "0" then options[#options + 1] = "deadline"; options[#options + 1] = ARGV[b + 9] end
    if ARGV[b + 10] ~= "0" then options[#options + 1] = "retention"; options[#options + 1] = ARGV[b + 10] end
    if ARGV[b + 11] ~= "-1" then options[#options + 1] = "retry_delay"; options[#options + 1] = ARGV[b + 11] end
    if lock_key then
      options[#options + 1] = "unique"
      options[#options + 1] = lock_key
      rcall("SET", lock_key, id, "PX", ARGV[b + 3])
    end
    if #options > 0 then
      rcall("HSET", task_key, unpack(options))
    end
    if has_completed then
      rcall("ZREM", completed_key, id)
    end
    if state == "pending" then
      ready[#ready + 1] = id
    else
      rcall("ZADD", scheduled_key, due, id)
    end
    detail = state
  end
  reply[#reply + 1] = code
  reply[#reply + 1] = detail
end
if #ready > 0 then
  -- One LPUSH for the call (same order as one per task); n <= 1,000 stays within unpack's limit.
  rcall("LPUSH", pending_key, unpack(ready))
  wake(wake_key)
end
return reply
