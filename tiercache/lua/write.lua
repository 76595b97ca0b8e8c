-- Apply a write, a delete or a clear, then announce it: one atomic step, publish last.
--
-- KEYS[1] the partition's sequence counter, KEYS[2] its invalidation log (a capped stream),
-- KEYS[3] the entry key (not given for a clear)
-- (ARGV[8] is the prefix for "P", empty for "C")
-- ARGV[1] op: "S" set, "D" delete, "C" clear, "P" clear of the keys with a prefix (the caller
-- already unlinked those entries)
-- ARGV[2] proposed version (an integer below 2^53)
-- ARGV[3] the envelope to store: the value (S) or the tombstone (D)
-- ARGV[4] its TTL in ms (0: none), ARGV[5] origin id, ARGV[6] channel, ARGV[7] log length bound,
-- ARGV[8] encoded user key (for the message), ARGV[9] the message's signature ("-": none),
-- ARGV[10] the highest plausible version (Redis time + 1 h): a stored version above it was
-- planted, not written by a cache, and is overwritten rather than obeyed
-- ARGV[11] "S": publish with SPUBLISH (Redis Cluster, sharded pub/sub); "P" (or absent): PUBLISH
--
-- One key holds a value, a tombstone or a fill lease (tiercache/envelope.py): overwriting it is
-- what makes a pending fill fail. Returns {1, version, seq, existed} when applied (existed: a
-- value was there; seq -1: a retry of this very write found it applied), or {0, current version}
-- when the proposed version is not above the stored one (the caller proposes again).

local op = ARGV[1]
local version = tonumber(ARGV[2])
local existed = 0

if op == "S" or op == "D" then
  local head = redis.call("GETRANGE", KEYS[3], 0, 13)
  local current = 0
  if #head == 14 and string.sub(head, 1, 2) == "TC" then
    for i = 7, 14 do
      current = current * 256 + string.byte(head, i)
    end
    -- flags (byte 4): tombstone 0x08, lease 0x10
    if string.byte(head, 4) % 32 < 8 then
      existed = 1
    end
    if current > tonumber(ARGV[10]) then
      current = 0
    end
  end
  if version <= current then
    if version == current and redis.call("GET", KEYS[3]) == ARGV[3] then
      return {1, ARGV[2], -1, existed}  -- a retry whose first reply was lost
    end
    return {0, string.format("%.0f", current)}
  end
  if tonumber(ARGV[4]) > 0 then
    redis.call("SET", KEYS[3], ARGV[3], "PX", ARGV[4])
  else
    redis.call("SET", KEYS[3], ARGV[3])
  end
end

-- The counter restarts (after data loss) at the current time in microseconds, above every number
-- it gave before; the "R" flag marks a message that starts a counter.
local seq = redis.call("INCR", KEYS[1])
local start = "+"
if seq == 1 then
  local now = redis.call("TIME")
  seq = tonumber(now[1]) * 1000000 + tonumber(now[2])
  redis.call("SET", KEYS[1], string.format("%.0f", seq))
  start = "R"
end
local msg = "TC1 " .. string.format("%.0f", seq) .. " " .. start .. " " .. ARGV[2] .. " "
  .. ARGV[5] .. " " .. op .. " " .. ARGV[9] .. "\n" .. ARGV[8]
redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[7], "*", "m", msg)
redis.call(ARGV[11] == "S" and "SPUBLISH" or "PUBLISH", ARGV[6], msg)
return {1, ARGV[2], seq, existed}
