-- Take or keep a partition's flush lock: one flusher at a time writes a partition to the origin,
-- so the writes of one key reach it in version order.
--
-- KEYS[1] the lock; ARGV[1] our token, ARGV[2] its TTL in ms.
-- Returns 1 if the lock is ours (taken or renewed), 0 if another flusher holds it.

local holder = redis.call("GET", KEYS[1])
if holder == false then
  redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call("PEXPIRE", KEYS[1], ARGV[2])
  return 1
end
return 0
