-- Store a refreshed value (an early refresh, or a stale-while-revalidate one) only if the entry
-- still holds the version the refresh started from: a write or delete since then wins, and the
-- refresh is discarded.
--
-- KEYS[1] the entry key, KEYS[2] the refresh marker
-- ARGV[1] the version the refresh started from, ARGV[2] the new value envelope,
-- ARGV[3] its TTL in ms (0: none), ARGV[4] the marker token (released if still ours)
--
-- Returns 1 when stored, 0 when overtaken.

if redis.call("GET", KEYS[2]) == ARGV[4] then
  redis.call("DEL", KEYS[2])
end
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
if tonumber(ARGV[3]) > 0 then
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
else
  redis.call("SET", KEYS[1], ARGV[2])
end
return 1
