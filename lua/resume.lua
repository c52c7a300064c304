--[[
  resume: let workers lease from a paused queue again, and wake the idle ones when tasks are
  waiting (they stopped listening for work only by finding the queue paused). Called by
  Queue.resume. Pausing is a plain SET of the paused key (no script needed).

  KEYS[1] -> {<prefix>:<queue>}:paused       string, present while the queue is paused
  KEYS[2] -> {<prefix>:<queue>}:pending      list, ids ready to run
  KEYS[3] -> {<prefix>:<queue>}:wake         list, wake-up token for idle workers (lib/wake)

  ARGV: none.

  Returns:
    1 when the queue was paused, 0 when it was not.
    {-5, key} when pending or wake holds another Redis type; nothing written.

  State change: paused -> running; a wake-up token when pending is not empty.
]]
-- @include "lib/types"
-- @include "lib/wake"
local paused_key, pending_key, wake_key = KEYS[1], KEYS[2], KEYS[3]

local wrong = first_wrong_type({pending_key, "list", wake_key, "list"})
if wrong then
  return {-5, wrong}
end

local was_paused = redis.call("DEL", paused_key)
if redis.call("LLEN", pending_key) > 0 then
  wake(wake_key)
end
return was_paused
