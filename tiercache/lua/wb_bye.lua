-- A flusher stops: release its lock if it still holds it, and remove its consumer record from
-- the group if it holds no entry (one with pending entries stays: another flusher claims them).
--
-- KEYS[1] the write-behind stream, KEYS[2] the flush lock
-- ARGV[1] consumer group, ARGV[2] consumer (also the lock token)
-- Returns 1 if the consumer record was removed, else 0.

if redis.call("GET", KEYS[2]) == ARGV[2] then
  redis.call("DEL", KEYS[2])
end
if redis.call("EXISTS", KEYS[1]) == 0 then
  return 0
end
local mine = redis.pcall("XPENDING", KEYS[1], ARGV[1], "-", "+", 1, ARGV[2])
if mine.err or #mine > 0 then  -- (no group yet: nothing to remove)
  return 0
end
redis.call("XGROUP", "DELCONSUMER", KEYS[1], ARGV[1], ARGV[2])
return 1
