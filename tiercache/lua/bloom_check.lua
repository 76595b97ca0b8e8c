-- Ask the filter about some encoded keys. Read-only (run by EVALSHA_RO, so it also runs while
-- writes are paused, and on replicas) and standalone: it runs with every Redis read of a cache
-- that has a filter, so it reads the header once (the completeness mark carries the current
-- generation's descriptor; see bloom_lib.lua for the layout and the hashing).
--
-- KEYS[1] the filter's header; ARGV the encoded keys (none: only the status).
--
-- Returns {status, r1, r2, ...}: status 1 = the filter is complete and whole, and r_i is 1
-- ("maybe") or 0 ("certainly absent") for ARGV[i]; otherwise no r_i, and the filter must not be
-- believed: 0 = not complete (no completeness mark), -1 = no filter (no header: never built,
-- flushed, restarted empty, evicted), -2 = a data key of the current generation is gone.
-- A server without the RedisBloom module answers an error for a "bf" generation: also "off".

local f = redis.call("HMGET", KEYS[1], "gen", "complete")
if not f[2] then
  return { f[1] and 0 or -1 }
end
local g, backend, m, k, parts = string.match(f[2], "^(%d+) (%a+) (%d+) (%d+) (%d+)$")
if g ~= f[1] then
  return { 0 } -- (a mark of another generation: never left behind by the scripts)
end
local base = string.sub(KEYS[1], 1, -5) .. "g" .. g
local out = { 1 }

if backend == "bf" then
  if redis.call("EXISTS", base) == 0 then
    return { -2 }
  end
  if #ARGV == 0 then
    redis.call("BF.EXISTS", base, "") -- an error here (no module) is the answer: off
  elseif #ARGV == 1 then
    out[2] = redis.call("BF.EXISTS", base, ARGV[1])
  else
    local r = redis.call("BF.MEXISTS", base, unpack(ARGV))
    for i = 1, #r do
      out[i + 1] = r[i]
    end
  end
  return out
end

m, k, parts = tonumber(m), tonumber(k), tonumber(parts)
local keys = {}
for i = 0, parts - 1 do
  keys[i + 1] = base .. ":" .. i
end
if redis.call("EXISTS", unpack(keys)) ~= parts then
  return { -2 }
end
local size = m / parts
for j = 1, #ARGV do
  local h = redis.sha1hex(ARGV[j])
  local a = tonumber(string.sub(h, 1, 12), 16) % m
  local b = tonumber(string.sub(h, 13, 24), 16) % m
  if b == 0 then
    b = 1
  end
  local hit = 1
  for i = 0, k - 1 do
    local pos = (a + i * b) % m
    local part = math.floor(pos / size)
    if redis.call("GETBIT", keys[part + 1], tostring(pos - part * size)) == 0 then
      hit = 0
      break
    end
  end
  out[j + 1] = hit
end
return out
