-- Store a value loaded from the origin, only if this fill's lease is still the current one: any
-- write or delete of the key since the lease was taken removed it (compare-and-set, as memcache
-- leases do), so a fill that read the origin before that write cannot put an old value back.
--
-- KEYS[1] value, KEYS[2] tombstone, KEYS[3] fill lease
-- ARGV[1] lease token, ARGV[2] proposed version, ARGV[3] envelope, ARGV[4] TTL in ms (0: none)
--
-- Returns {1, version} when stored, {0, "lease"} when the lease is gone, or
-- {0, current version} when the proposed version is not above the stored one.

local function envelope_version(env)
  if not env or #env < 34 or string.sub(env, 1, 2) ~= "TC" then
    return 0
  end
  local v = 0
  for i = 7, 14 do
    v = v * 256 + string.byte(env, i)
  end
  return v
end

if redis.call("GET", KEYS[3]) ~= ARGV[1] then
  return {0, "lease"}
end
local current = envelope_version(redis.call("GET", KEYS[1]))
local tomb = tonumber(redis.call("GET", KEYS[2]) or "0") or 0
if tomb > current then
  current = tomb
end
if tonumber(ARGV[2]) <= current then
  return {0, string.format("%.0f", current)}
end
if tonumber(ARGV[4]) > 0 then
  redis.call("SET", KEYS[1], ARGV[3], "PX", ARGV[4])
else
  redis.call("SET", KEYS[1], ARGV[3])
end
redis.call("DEL", KEYS[3])
return {1, ARGV[2]}
