-- Before loading a missing key from the origin: take its fill lease, unless a value arrived.
--
-- KEYS[1] value, KEYS[2] fill lease
-- ARGV[1] lease token (random), ARGV[2] lease TTL in ms
--
-- Returns {"v", envelope} if a value is there now, {"l"} when the lease is ours, or
-- {"w", remaining ms} when another process holds it.

local env = redis.call("GET", KEYS[1])
if env then
  return {"v", env}
end
if redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  return {"l"}
end
return {"w", redis.call("PTTL", KEYS[2])}
