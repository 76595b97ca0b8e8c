-- Finish write-behind entries: acknowledge and delete them (the writer applied them, or a newer
-- version superseded them), or move them to the dead-letter stream first (the writer kept
-- failing); then forget the high-water marks they reached.
--
-- KEYS[1] the write-behind stream, KEYS[2] the dead-letter stream, KEYS[3] the high-water hash
-- ARGV[1] consumer group, ARGV[2] "ack" or "dead", ARGV[3] the error text (for "dead"),
-- ARGV[4] attempts made (for "dead"), ARGV[5] n, the number of entry ids, ARGV[6 .. 5+n] the
-- ids, then pairs (encoded key, version) of the keys finished: a mark still at that version is
-- removed (no older entry of the key is left: entries are finished in stream order).
--
-- Returns how many entries were deleted from the stream.

local n = tonumber(ARGV[5])
local ids = {}
for i = 6, 5 + n do
  ids[#ids + 1] = ARGV[i]
end
for i = 6 + n, #ARGV, 2 do
  if redis.call("HGET", KEYS[3], ARGV[i]) == ARGV[i + 1] then
    redis.call("HDEL", KEYS[3], ARGV[i])
  end
end
if #ids == 0 then
  return 0
end
if ARGV[2] == "dead" then
  for _, id in ipairs(ids) do
    local rec = redis.call("XRANGE", KEYS[1], id, id)
    if rec[1] then
      local fields = rec[1][2]
      fields[#fields + 1] = "id"
      fields[#fields + 1] = id
      fields[#fields + 1] = "error"
      fields[#fields + 1] = ARGV[3]
      fields[#fields + 1] = "attempts"
      fields[#fields + 1] = ARGV[4]
      redis.call("XADD", KEYS[2], "*", unpack(fields))
    end
  end
end
redis.call("XACK", KEYS[1], ARGV[1], unpack(ids))
return redis.call("XDEL", KEYS[1], unpack(ids))
