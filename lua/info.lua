--[[
  info: read one task and when it is next due. Read-only. Called by Queue.info.

  KEYS[1] -> {<prefix>:<queue>}:t:<id>       hash, the task
  KEYS[2] -> {<prefix>:<queue>}:scheduled    zset, delayed ids scored by due time (ms)
  KEYS[3] -> {<prefix>:<queue>}:retry        zset, failed ids scored by next attempt (ms)
  KEYS[4] -> {<prefix>:<queue>}:active       zset, leased ids scored by lease expiry (ms)

  ARGV[1] -> task id

  Returns:
    {due_ms, field_1, value_1, ...}: the hash's fields; due_ms is the score in the zset its state
    names (next attempt or lease expiry), -1 when it has none. {} when the task does not exist.
    A format-3 task's payload comes whole as "p", without its pieces (lib/payload); when a
    piece is missing, every field comes as stored.
    {-5, key} when the task key holds another Redis type.

  State change: none.
]]
-- @include "lib/types"
-- @include "lib/payload"
local task_key = KEYS[1]
local t = key_type(task_key)
if t == "none" then
  return {}
elseif t ~= "hash" then
  return {-5, task_key}
end
local fields = redis.call("HGETALL", task_key)
local stored = {}
for i = 1, #fields, 2 do
  stored[fields[i]] = fields[i + 1]
end
local state = stored["s"]
local zsets = {scheduled = KEYS[2], retry = KEYS[3], active = KEYS[4]}
local due = -1
if zsets[state] then
  local score = redis.pcall("ZSCORE", zsets[state], ARGV[1])
  if type(score) == "string" then
    due = tonumber(score)
  end
end
local whole = nil
if tonumber(stored["v"]) == 3 then
  whole = joined_payload(task_key, stored["p"], stored["n"])
end
local reply = {due}
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  if whole and name == "p" then
    value = whole
  elseif whole and (name == "n" or tonumber(name)) then
    name = nil  -- a piece, already in the payload
  end
  if name then
    reply[#reply + 1] = name
    reply[#reply + 1] = value
  end
end
return reply
