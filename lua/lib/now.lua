-- now_ms: the server's clock in milliseconds since the epoch, from Redis TIME.
-- Every due time and lease expiry is computed here, never from a client's clock.
local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
