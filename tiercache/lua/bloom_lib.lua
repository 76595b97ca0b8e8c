-- The negative filter's shared Lua: tiercache/bloom.py prepends this file to the scripts that
-- write (bloom_add.lua, bloom_admin.lua), so each is self-contained and called by its own SHA.
-- The read path's bloom_check.lua stands alone (less to run on every Redis read).
--
-- KEYS[1] is the filter's header, a hash "<ns>:{<ns>:bf}:meta"; every other key of the filter
-- shares its prefix, hence its hash slot (the whole filter lives in one slot of a cluster):
--
--   gen        the current generation g (the filter that answers)
--   complete   the completeness mark, set once warm() or a rebuild has loaded every key into
--              the current generation: its descriptor "<g> <backend> <m> <k> <parts>", so a
--              check reads one field. Without it (or without the header) nothing is "absent".
--   next       the generation a rebuild is filling (registrations go to both g and next)
--   last       the highest generation number allocated (they start from the clock, in µs)
--   b:<g>      backend of g: "bf" (RedisBloom: one key <prefix>g<g>) or "bits" (bitmaps
--              <prefix>g<g>:<part>, part = 0 .. p:<g> - 1)
--   m:<g> k:<g> p:<g>   bits, hashes and bitmap parts of a "bits" generation
--   c:<g> e:<g> x:<g>   capacity, error rate, expansion it was sized for
--   n:<g>      items added that set at least one bit (were new to the filter)
--
-- Numbers go to Redis as strings made here (tostring: plain digits below 1e14), never as Lua
-- numbers, whose conversion may use exponent notation on some servers ("1e+08").
--
-- Hashing ("bits", in bloom_check.lua and bloom_add.lua): SHA-1 of the encoded key; two
-- independent 48-bit hashes h1, h2 from disjoint hex digits; positions (h1 + i*h2) mod m for
-- i = 0 .. k-1 (Kirsch-Mitzenmacher double hashing); position q is bit q mod size of part
-- floor(q / size), size = m / parts.

local META = KEYS[1]
local BASE = string.sub(META, 1, -5) -- without "meta"

-- The description of generation g (nil when the header does not describe it).
local function params(g)
  if not g then
    return nil
  end
  g = tostring(g)
  local f = redis.call("HMGET", META, "b:" .. g, "m:" .. g, "k:" .. g, "p:" .. g)
  if not f[1] then
    return nil
  end
  local p = { g = g, backend = f[1], m = tonumber(f[2]), k = tonumber(f[3]) }
  p.parts = tonumber(f[4])
  p.descriptor = table.concat({ g, f[1], f[2], f[3], f[4] }, " ")
  p.keys = {}
  if p.backend == "bf" then
    p.keys[1] = BASE .. "g" .. g
  else
    p.size = p.m / p.parts
    for i = 0, p.parts - 1 do
      p.keys[i + 1] = BASE .. "g" .. g .. ":" .. i
    end
  end
  return p
end

-- Whether every data key of a generation exists: one lost key (DEL, eviction) loses the filter.
local function intact(p)
  if p == nil then
    return false
  end
  return redis.call("EXISTS", unpack(p.keys)) == #p.keys
end

-- The sizing of a generation to create, from ARGV[at .. at+6]: backend ("bf" | "bits"), capacity,
-- error rate, expansion, bits, hashes, parts.
local function read_spec(at)
  return {
    at = at,
    backend = ARGV[at],
    capacity = ARGV[at + 1],
    error = ARGV[at + 2],
    expansion = ARGV[at + 3],
    m = tonumber(ARGV[at + 4]),
    k = tonumber(ARGV[at + 5]),
    parts = tonumber(ARGV[at + 6]),
  }
end

-- A generation number never used by this filter, even across a loss of its header: a new header
-- starts counting from the server's clock in microseconds, so a warm() or rebuild() that began
-- before a loss cannot mistake a generation created after it for its own.
local function new_generation()
  if redis.call("HEXISTS", META, "last") == 0 then
    local t = redis.call("TIME")
    redis.call("HSET", META, "last", t[1] .. string.format("%06d", tonumber(t[2])))
  end
  return string.format("%d", redis.call("HINCRBY", META, "last", 1))
end

-- Allocate and reserve a new, empty generation (not current, not complete).
local function create(spec)
  local gs = new_generation()
  if spec.backend == "bf" then
    local key = BASE .. "g" .. gs
    redis.call("DEL", key)
    redis.call("BF.RESERVE", key, spec.error, spec.capacity, "EXPANSION", spec.expansion)
  else
    local size = spec.m / spec.parts
    for i = 0, spec.parts - 1 do
      local key = BASE .. "g" .. gs .. ":" .. i
      redis.call("DEL", key)
      redis.call("SETBIT", key, tostring(size - 1), "0") -- allocates the part at full size
    end
  end
  redis.call("HSET", META, "b:" .. gs, spec.backend, "m:" .. gs, ARGV[spec.at + 4],
    "k:" .. gs, ARGV[spec.at + 5], "p:" .. gs, ARGV[spec.at + 6], "c:" .. gs, spec.capacity,
    "e:" .. gs, spec.error, "x:" .. gs, spec.expansion, "n:" .. gs, "0")
  return params(gs)
end

local function forget(p)
  if p == nil then
    return
  end
  redis.call("UNLINK", unpack(p.keys))
  local g = p.g
  redis.call("HDEL", META, "b:" .. g, "m:" .. g, "k:" .. g, "p:" .. g, "c:" .. g, "e:" .. g,
    "x:" .. g, "n:" .. g)
end

-- Whether a generation can be written and read: whole, and for "bf" the server has the module
-- (an unknown command, or a key that is no RedisBloom filter, makes it unusable).
local function usable(p)
  if not intact(p) then
    return false
  end
  if p.backend == "bf" then
    local r = redis.pcall("BF.EXISTS", p.keys[1], "")
    if type(r) == "table" and r.err then
      return false
    end
  end
  return true
end

-- Make the filter whole before writing to it: with no header, or a current generation that lost
-- a data key (or cannot be used), a new empty generation becomes current and the completeness
-- mark goes (a partly lost filter never answers again until warm() runs); a rebuild's generation
-- that lost a key is dropped. Returns (current, next or nil, complete 1/0).
local function ensure(spec)
  local f = redis.call("HMGET", META, "gen", "next", "complete")
  local cur = params(f[1])
  local nxt = params(f[2])
  if f[2] and not usable(nxt) then
    forget(nxt)
    redis.call("HDEL", META, "next")
    nxt = nil
  end
  if not usable(cur) then
    redis.call("HDEL", META, "complete")
    forget(cur)
    cur = create(spec)
    redis.call("HSET", META, "gen", cur.g)
    return cur, nxt, 0
  end
  return cur, nxt, (f[3] and string.match(f[3], "^%d+") == cur.g) and 1 or 0
end
