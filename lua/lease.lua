--[[
  lease: move up to n ready tasks of one queue from pending to active, each with a fresh lease
  (its id with the call's token) and a lease expiry from the server clock. Called by
  Queue.lease (qsync/_ops.py lease).

  KEYS[1] -> {<prefix>:<queue>}:pending      list, ids ready to run (RPOP: oldest first)
  KEYS[2] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)
  KEYS[3] -> {<prefix>:<queue>}:archived     zset, dead ids scored by archive time (ms)
  KEYS[4] -> {<prefix>:<queue>}:paused       string, present while the queue is paused
  KEYS[5] -> {<prefix>:<queue>}:t:           the task-hash key prefix (not a key itself)
  KEYS[6] -> {<prefix>:<queue>}:wake         list, wake-up token for idle workers (lib/wake)

  ARGV[1] -> n, the most tasks to lease (1..1000)
  ARGV[2] -> lease duration (ms)
  ARGV[3] -> the lease token: random per call, given to every task of the call (a lease is the
             pair of task id and token, and an id is leased once per call)
  ARGV[4] -> the highest task format version ("v") this worker understands

  Derived keys: KEYS[5] .. id (a popped id's hash) and the hash's "unique" field (its lock);
  both carry the queue's hash tag, so the call stays in one slot.

  Returns:
    {now_ms, expires_ms, n_deadline, n_corrupt, n_orphan, then 8 fields per leased task:
     id, type, payload, retried, max_retry, timeout_ms, deadline_ms, retry_delay_ms}
    (the payload whole: a format-3 task's pieces are joined here, lib/payload)
    (timeout/deadline 0 and retry_delay -1 when unset). A paused queue leases nothing.
    {-5, key} when a container key holds another Redis type; nothing written.

  State change: pending -> active, and a wake-up token when a full batch left tasks pending
  (so a burst wakes idle workers one after another). On the way, a task whose deadline has passed goes to
  archived ("deadline exceeded"), a hash with missing or malformed fields goes to archived
  ("corrupt: ...", raw fields kept), and a popped id with no hash is dropped (orphan), as is
  a second copy of an id in one call (pending holds each id once; a copy would share the
  lease). A task written by a newer qsync ("v" above ARGV[4]) is put back at the tail,
  unleased and untouched.
  Invariants: every leased id is in active and nowhere else, its hash state is "active" and its
  "token" field holds ARGV[3]; no id is lost by being popped.
]]
-- @include "lib/now"
-- @include "lib/types"
-- @include "lib/archive"
-- @include "lib/wake"
-- @include "lib/payload"
local rcall = redis.call
local pending_key, active_key, archived_key, paused_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local task_prefix, wake_key = KEYS[5], KEYS[6]
local n, lease_ms, token, max_version = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])

local wrong = first_wrong_type({pending_key, "list", active_key, "zset", archived_key, "zset",
                                 wake_key, "list"})
if wrong then
  return {-5, wrong}
end

local now = now_ms()
local expires = now + lease_ms
local reply = {now, expires, 0, 0, 0}
if rcall("EXISTS", paused_key) == 1 then
  return reply
end

-- One RPOP for the batch (oldest first) and one ZADD for the ids leased, rather than one of each
-- per task: this loop is every task's hot path, and a call from Lua costs more than its command.
local ids = rcall("RPOP", pending_key, n) or {}
local leased, seen = {}, {}
local expires_arg = string.format("%d", expires)  -- one number formatted per call, not per task
for i = 1, #ids do
  local id = ids[i]
  local task_key = task_prefix .. id
  -- pcall: a task key of another type reads as an error table, which counts as an orphan.
  -- The optional fields are not named here: each one a hash lacks costs a scan of the whole
  -- hash. They are read in a second call when "o" (lua/enqueue.lua) says a task has them, and
  -- always for a task of format 1 (written before "o" existed). Likewise "n" and the pieces
  -- of a payload are read only for a task of format 3 (naming "n" here cost every plain
  -- task's lease 2-5%, measured).
  local f = not seen[id] and redis.pcall("HMGET", task_key, "v", "t", "p", "r", "m", "o")
  seen[id] = true
  if not f or f.err or (not f[1] and not f[2] and not f[3] and rcall("EXISTS", task_key) == 0) then
    reply[5] = reply[5] + 1
  elseif tonumber(f[1]) and tonumber(f[1]) > max_version then
    -- Written by a newer qsync, which may name or encode its fields otherwise: nothing of it is
    -- read or judged here. Back at the tail, for a worker that can read it.
    rcall("LPUSH", pending_key, id)
  else
    local version, retried, max_retry, flags = tonumber(f[1]), tonumber(f[4]), tonumber(f[5]), f[6]
    if version ~= 1 and version ~= 2 and version ~= 3 then
      version = nil  -- not a format this script reads (0, 2.5, nan): corrupt, never guessed at
    end
    local payload = f[3]
    if version == 3 then
      payload = joined_payload(task_key, payload, rcall("HGET", task_key, "n"))
    end
    local timeout, deadline, retry_delay = 0, 0, -1
    if (version ~= 2 and version ~= 3) or (flags and flags ~= "2") then
      local o = rcall("HMGET", task_key, "timeout", "deadline", "retry_delay")
      timeout, retry_delay = o[1] and tonumber(o[1]) or 0, o[3] and tonumber(o[3]) or -1
      if o[2] then
        deadline = tonumber(o[2])  -- nil when malformed: archived as corrupt below
      end
    end
    local missing = nil
    if not version then missing = "v (format version)"
    elseif not f[2] then missing = "t (type)"
    elseif not payload then missing = "p (payload)"
    elseif not retried then missing = "r (retried)"
    elseif not max_retry then missing = "m (max_retry)"
    elseif not deadline then missing = "deadline"
    end
    if missing then
      archive_task(task_key, id, archived_key, now, "corrupt: field " .. missing .. " missing or malformed",
                   rcall("HGET", task_key, "unique"))
      reply[4] = reply[4] + 1
    elseif deadline > 0 and now >= deadline then
      archive_task(task_key, id, archived_key, now, "deadline exceeded", rcall("HGET", task_key, "unique"))
      reply[3] = reply[3] + 1
    else
      rcall("HSET", task_key, "s", "active", "token", token)
      leased[#leased + 1] = expires_arg
      leased[#leased + 1] = id
      local r = #reply
      reply[r + 1] = id
      reply[r + 2] = f[2]
      reply[r + 3] = payload
      reply[r + 4] = retried
      reply[r + 5] = max_retry
      reply[r + 6] = timeout
      reply[r + 7] = deadline
      reply[r + 8] = retry_delay
    end
  end
end
for first = 1, #leased, 1000 do
  rcall("ZADD", active_key, unpack(leased, first, math.min(first + 999, #leased)))
end
-- A full batch may have left work behind: pass the wake-up on to the next idle worker.
if (#reply - 5) / 8 == n and rcall("LLEN", pending_key) > 0 then
  wake(wake_key)
end
return reply
