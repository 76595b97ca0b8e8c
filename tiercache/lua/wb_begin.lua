-- Before a flusher hands a batch to the writer: raise each key's high-water mark, the highest
-- version ever handed to a writer, and drop the items below it.
--
-- A flusher that died in the middle of a batch may have applied a later version of a key than
-- the first entries its successor claims (which come in stream order, a batch at a time): those
-- older entries must then be skipped, not applied over it. The newer entry is still pending
-- (never acknowledged), so the successor applies it when it gets there.
--
-- KEYS[1] the partition's high-water hash (encoded key -> version)
-- ARGV: pairs of (encoded key, version)
-- Returns one flag per pair: 1 hand it to the writer, 0 skip it (a newer version went out).

local out = {}
for i = 1, #ARGV, 2 do
  local current = redis.call("HGET", KEYS[1], ARGV[i])
  if current and tonumber(current) > tonumber(ARGV[i + 1]) then
    out[#out + 1] = 0
  else
    redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1])
    out[#out + 1] = 1
  end
end
return out
