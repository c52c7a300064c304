-- wake: leave one wake-up token on the queue's wake list, which idle workers block on (BRPOP).
-- The list is capped at one entry: a token means "look again", however many tasks arrived.
local function wake(wake_key)
  redis.call("LPUSH", wake_key, "1")
  redis.call("LTRIM", wake_key, 0, 0)
end
