-- Claim the refresh of an entry (the "refreshing" marker of XFetch and stale-while-revalidate):
-- only while the entry still holds the version the refresh would start from, so a process that
-- read a version another one has already refreshed does not call the origin for nothing, and
-- only if no other process holds the claim.
--
-- KEYS[1] the entry key, KEYS[2] the refresh marker
-- ARGV[1] the expected version, ARGV[2] the marker token, ARGV[3] the claim's TTL in ms
--
-- Returns 1 when claimed, 0 otherwise.

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
if redis.call("SET", KEYS[2], ARGV[2], "NX", "PX", ARGV[3]) then
  return 1
end
return 0
