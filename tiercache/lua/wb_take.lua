-- Take the next batch of write-behind entries of a partition for this flusher, in stream order.
--
-- KEYS[1] the write-behind stream, KEYS[2] the partition's flush lock
-- ARGV[1] consumer group, ARGV[2] consumer (this flusher), ARGV[3] lock token, ARGV[4] lock TTL
-- in ms, ARGV[5] batch size, ARGV[6] min idle time (ms) before another flusher's entries are
-- claimed
--
-- Order of sources, so that no write is taken before an older write of the same key:
--   1. our own pending entries (a batch the writer failed: retried as it was)
--   2. entries of a flusher that died (pending and idle >= ARGV[6]), claimed with XAUTOCLAIM
--   3. if other pending entries remain (a flusher that may still be alive): nothing; wait
--   4. new entries (XREADGROUP ">")
--
-- Returns {"busy"} (another flusher holds the lock), {"wait"}, {"empty"} (then the records of
-- consumers that hold nothing and stayed idle past ARGV[6] are removed), or
-- {"ok", source, entries, deliveries} with entries as XREADGROUP gives them ({id, fields}) and
-- deliveries the matching delivery counts (each take counts one: the attempts so far).

local holder = redis.call("GET", KEYS[2])
if holder == false then
  redis.call("SET", KEYS[2], ARGV[3], "PX", ARGV[4])
elseif holder ~= ARGV[3] then
  return {"busy"}
else
  redis.call("PEXPIRE", KEYS[2], ARGV[4])
end

local made = redis.pcall("XGROUP", "CREATE", KEYS[1], ARGV[1], "0", "MKSTREAM")
if type(made) == "table" and made.err and not string.find(made.err, "BUSYGROUP") then
  return redis.error_reply(made.err)
end

local function ack(ids)
  if #ids > 0 then
    redis.call("XACK", KEYS[1], ARGV[1], unpack(ids))
  end
end

-- Entries whose stream record is gone (deleted by hand): acknowledge, keep the others.
local function live(entries)
  local out, gone = {}, {}
  for _, e in ipairs(entries) do
    if e[2] then
      out[#out + 1] = e
    else
      gone[#gone + 1] = e[1]
    end
  end
  ack(gone)
  return out
end

local source = "own"
local entries = {}
local own = redis.call("XREADGROUP", "GROUP", ARGV[1], ARGV[2], "COUNT", ARGV[5],
  "STREAMS", KEYS[1], "0")
if own and own[1] then
  entries = live(own[1][2])
end
if #entries == 0 then
  source = "claimed"
  local cursor = "0-0"
  repeat
    local r = redis.call("XAUTOCLAIM", KEYS[1], ARGV[1], ARGV[2], ARGV[6], cursor,
      "COUNT", ARGV[5])
    cursor = r[1]
    entries = live(r[2] or {})
    if r[3] then
      ack(r[3])
    end
  until #entries > 0 or cursor == "0-0"
end
if #entries == 0 then
  local summary = redis.call("XPENDING", KEYS[1], ARGV[1])
  if tonumber(summary[1]) > 0 then
    return {"wait"}
  end
  source = "new"
  local fresh = redis.call("XREADGROUP", "GROUP", ARGV[1], ARGV[2], "COUNT", ARGV[5],
    "STREAMS", KEYS[1], ">")
  if fresh and fresh[1] then
    entries = live(fresh[1][2])
  end
end
if #entries == 0 then
  -- Idle: forget the consumers that hold nothing and were idle longer than the claim delay
  -- (flushers that stopped; a live one is simply re-created by its next read).
  for _, info in ipairs(redis.call("XINFO", "CONSUMERS", KEYS[1], ARGV[1])) do
    local c = {}
    for i = 1, #info, 2 do
      c[info[i]] = info[i + 1]
    end
    if c["name"] ~= ARGV[2] and tonumber(c["pending"]) == 0
        and tonumber(c["idle"]) > tonumber(ARGV[6]) then
      redis.call("XGROUP", "DELCONSUMER", KEYS[1], ARGV[1], c["name"])
    end
  end
  return {"empty"}
end

local counts = {}
local detail = redis.call("XPENDING", KEYS[1], ARGV[1], entries[1][1], entries[#entries][1],
  #entries, ARGV[2])
local by_id = {}
for _, d in ipairs(detail) do
  by_id[d[1]] = d[4]
end
for i, e in ipairs(entries) do
  counts[i] = by_id[e[1]] or 1
end
return {"ok", source, entries, counts}
