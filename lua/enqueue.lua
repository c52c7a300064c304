--[[
  enqueue: put new tasks on one queue, ready now (pending) or at a later time (scheduled).
  Called by Queue.enqueue / Queue.enqueue_many (qsync/_ops.py enqueue_many).

  KEYS[1] -> {<prefix>:<queue>}:pending      list, ids ready to run (LPUSH in, RPOP out)
  KEYS[2] -> {<prefix>:<queue>}:scheduled    zset, ids scored by due time (ms)
  KEYS[3] -> {<prefix>:<queue>}:wake         list, wake-up token for idle workers (lib/wake)
  KEYS[4] -> {<prefix>:<queue>}:completed    zset, retained finished ids (a reused id leaves it)
  KEYS[5..] -> per task, in task order:
               {<prefix>:<queue>}:t:<id>     hash, the task (format 3 for a payload in pieces)
               {<prefix>:<queue>}:u:<key>    string, its unique lock (only when its profile has a TTL)

  ARGV[1] -> n, the number of tasks
  ARGV[2] -> m, the number of profiles
  ARGV[3..] -> 9 fields per profile j (what tasks of one type and options share), from ARGV[3 + (j-1)*9]:
    +0 type               +1 max_retry                 +2 timeout (ms, 0: none)
    +3 deadline (ms since epoch, 0: none)              +4 retention (ms, 0: delete when done)
    +5 retry delay (ms, -1: the worker's policy)       +6 delay (ms after server now, 0: none)
    +7 process at (ms since epoch, 0: none)            +8 unique lock TTL (ms, 0: no lock)
  then 4 fields per task i, from ARGV[3 + m*9 + (i-1)*4]:
    +0 id                 +1 its profile (1..m)        +2 payload (bytes)
    +3 fingerprint of type, payload and options

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
  A payload of 65 to 512 bytes is stored in pieces (format 3, lib/payload), so the hash stays
  a compact listpack; any other task is format 2.
  Invariants: a new id is in exactly one of pending/scheduled and its hash state names it;
  a unique lock exists only with the id of a live task.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/wake"
-- @include "lib/payload"
local rcall = redis.call
local pending_key = KEYS[1]
local scheduled_key = KEYS[2]
local wake_key, completed_key = KEYS[3], KEYS[4]
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local PROFILE_STRIDE, TASK_STRIDE = 9, 4

local wrong = first_wrong_type({pending_key, "list", scheduled_key, "zset", wake_key, "list",
                                 completed_key, "zset"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local created = string.format("%d", now)  -- once per call, not a number conversion per task

-- What tasks of one profile share is worked out once: due time, state, the optional fields.
local profiles = {}
for j = 1, m do
  local p = 3 + (j - 1) * PROFILE_STRIDE
  local delay, at = tonumber(ARGV[p + 6]), tonumber(ARGV[p + 7])
  local due = now
  if at > 0 then
    due = at
  elseif delay > 0 then
    due = now + delay
  end
  -- Only non-default options are stored: the hash is most of a task's memory.
  local options = {}
  if ARGV[p + 2] ~= "0" then options[#options + 1] = "timeout"; options[#options + 1] = ARGV[p + 2] end
  if ARGV[p + 3] ~= "0" then options[#options + 1] = "deadline"; options[#options + 1] = ARGV[p + 3] end
  if ARGV[p + 4] ~= "0" then options[#options + 1] = "retention"; options[#options + 1] = ARGV[p + 4] end
  if ARGV[p + 5] ~= "-1" then options[#options + 1] = "retry_delay"; options[#options + 1] = ARGV[p + 5] end
  -- "o" tells lease and ack which optional fields to read, so the hot path never asks for
  -- fields a task lacks (each costs a scan of the whole hash): 1 = timeout, deadline or
  -- retry_delay (lease reads them), 2 = retention or a unique lock (ack reads them), 3 = both.
  -- A plain task has no "o" (format 2: missing means none), which keeps its hash small.
  local flags = 0
  if ARGV[p + 2] ~= "0" or ARGV[p + 3] ~= "0" or ARGV[p + 5] ~= "-1" then flags = 1 end
  if ARGV[p + 4] ~= "0" or ARGV[p + 8] ~= "0" then flags = flags + 2 end
  if flags > 0 then options[#options + 1] = "o"; options[#options + 1] = tostring(flags) end
  profiles[j] = {
    type = ARGV[p], max_retry = ARGV[p + 1], options = options, due = due,
    state = due > now and "scheduled" or "pending",
    lock_ttl = ARGV[p + 8] ~= "0" and ARGV[p + 8] or nil,
  }
end

local reply = {now}
local ready = {}  -- ids going to pending, in order
-- A completed task's hash expires on its own (PEXPIRE) while its id waits in completed for trim;
-- an id reused after that expiry must leave completed, or it would be in two containers.
local has_completed = rcall("EXISTS", completed_key) == 1

local key_index = 4
local t = 3 + m * PROFILE_STRIDE
for _ = 1, n do
  local id, profile, fingerprint = ARGV[t], profiles[tonumber(ARGV[t + 1])], ARGV[t + 3]
  key_index = key_index + 1
  local task_key = KEYS[key_index]
  local lock_key = nil
  if profile.lock_ttl then
    key_index = key_index + 1
    lock_key = KEYS[key_index]
  end
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
    local state = profile.state
    local version, payload, extra = "2", ARGV[t + 2], profile.options
    if #payload > LONGEST_IN_ONE_FIELD then  -- no call for a small payload: enqueue's hot path
      local pieces
      version, payload, pieces = payload_fields(payload)
      if pieces then  -- format 3: the pieces go last, after the fields lease and ack read
        extra = {unpack(profile.options)}
        for i = 1, #pieces do
          extra[#extra + 1] = pieces[i]
        end
      end
    end
    rcall("HSET", task_key, "v", version, "t", profile.type, "p", payload, "f", fingerprint,
          "s", state, "m", profile.max_retry, "r", "0", "c", created, unpack(extra))
    if lock_key then
      rcall("SET", lock_key, id, "PX", profile.lock_ttl)
      rcall("HSET", task_key, "unique", lock_key)
    end
    if has_completed then
      rcall("ZREM", completed_key, id)
    end
    if state == "pending" then
      ready[#ready + 1] = id
    else
      rcall("ZADD", scheduled_key, profile.due, id)
    end
    detail = state
  end
  reply[#reply + 1] = code
  reply[#reply + 1] = detail
  t = t + TASK_STRIDE
end
if #ready > 0 then
  -- One LPUSH for the call (same order as one per task); n <= 1,000 stays within unpack's limit.
  rcall("LPUSH", pending_key, unpack(ready))
  wake(wake_key)
end
return reply
