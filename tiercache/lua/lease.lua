-- Before loading a missing key from the origin: take its fill lease, unless a value arrived.
--
-- KEYS[1] the entry key
-- ARGV[1] lease envelope template (tiercache/envelope.py: LEASE flag, the token as payload;
-- its version bytes are replaced by the version the key has now), ARGV[2] lease TTL in ms,
-- ARGV[3] (optional) bytes the caller read there and rejected (a payload that does not verify
-- or parse): if the key still holds exactly them, the lease replaces them
--
-- Returns {"v", envelope} if a value is there, {"w", remaining ms} if another fill holds the
-- lease, or {"l", version} when the lease is ours (version: what the key had, 0 if nothing).

local env = redis.call("GET", KEYS[1])
local version = 0
if env and ARGV[3] and env == ARGV[3] then
  env = false
end
if env and #env >= 34 and string.sub(env, 1, 2) == "TC" then
  local flags = string.byte(env, 4) % 32
  if flags >= 16 then
    return {"w", redis.call("PTTL", KEYS[1])}
  end
  if flags < 8 then
    return {"v", env}
  end
  for i = 7, 14 do
    version = version * 256 + string.byte(env, i)
  end
end
local tpl = ARGV[1]
local bytes = {}
local v = version
for i = 8, 1, -1 do
  bytes[i] = v % 256
  v = math.floor(v / 256)
end
local lease = string.sub(tpl, 1, 6) .. string.char(unpack(bytes)) .. string.sub(tpl, 15)
redis.call("SET", KEYS[1], lease, "PX", ARGV[2])
return {"l", string.format("%.0f", version)}
