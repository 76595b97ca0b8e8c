-- Sliding TTL: extend an entry's TTL on a read, if it still holds the version that was read,
-- and keep its tag keys alive at least as long (tiercache/tags.py).
--
-- KEYS[1] the entry key, KEYS[2..] its tag keys; ARGV[1] the version read, ARGV[2] the TTL in ms.
-- Returns 1 when extended, 0 when the entry changed or is gone.

local head = redis.call("GETRANGE", KEYS[1], 0, 13)
if #head ~= 14 or string.sub(head, 1, 2) ~= "TC" then
  return 0
end
local current = 0
for i = 7, 14 do
  current = current * 256 + string.byte(head, i)
end
if current ~= tonumber(ARGV[1]) then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call("PEXPIRE", KEYS[1], ttl)
for i = 2, #KEYS do
  local pttl = redis.call("PTTL", KEYS[i])
  if pttl >= 0 and pttl < ttl then
    redis.call("PEXPIRE", KEYS[i], ttl)
  end
end
return 1
