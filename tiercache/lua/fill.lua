-- Store a value loaded from the origin, only if this fill's lease is still in the key: a write or
-- delete since the lease was taken overwrote it (compare-and-set, as memcache leases do), so a
-- fill that read the origin before that write cannot put an old value back.
--
-- KEYS[1] the entry key
-- ARGV[1] our lease envelope as stored (compared byte for byte, so the token and version match)
-- ARGV[2] the value envelope, ARGV[3] its TTL in ms (0: none)
--
-- Returns 1 when stored, 0 when the lease is gone.

if redis.call("GET", KEYS[1]) ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
else
  redis.call("SET", KEYS[1], ARGV[2])
end
return 1
