--[[
  unblock: end one idle worker's blocking wait on a queue at once, so that the lease it sent
  behind its BRPOP runs now and the slots it reserved for that lease come back (the worker got
  busy, or is stopping). Called by the worker server's waker (qsync/_ops.py unblock).

  KEYS[1] -> {<prefix>:<queue>}:wake:<listener>   list, one listener's own wake key, which it
                                                  BRPOPs together with the queue's wake list

  ARGV[1] -> how long (ms) the token may wait for its listener: one that has already returned
             never pops it, and the key then expires instead of staying behind

  Returns:
    1 once the token is there.
    {-5, key} when the key holds another Redis type; nothing written.

  State change: none for any task; one token on the listener's key (capped at one, with a TTL).
]]
-- @include "lib/types"
local listener_key = KEYS[1]

local wrong = first_wrong_type({listener_key, "list"})
if wrong then
  return {-5, wrong}
end

redis.call("LPUSH", listener_key, "1")
redis.call("LTRIM", listener_key, 0, 0)
redis.call("PEXPIRE", listener_key, ARGV[1])
return 1
