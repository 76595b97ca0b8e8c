-- Add encoded keys to the filter. Prepended with bloom_lib.lua.
--
-- KEYS[1] the filter's header
-- ARGV[1] target: "" = a registration: the current generation and, during a rebuild, the next
--         one too; a number = only that generation (warm and rebuild fill their own)
-- ARGV[2..8] the sizing of a generation this call may have to create (see read_spec)
-- ARGV[9..] the encoded keys (none: only make the filter whole and report)
--
-- The filter is made whole first (ensure: a missing or partly lost filter is replaced by an empty
-- one, without the completeness mark). Data keys are only ever written after that check, never
-- created by writing to them (BF.MADD or SETBIT on a missing key would), which could otherwise
-- bring back a lost filter half empty.
--
-- Returns {status, current generation, complete (1/0), keys new to the target}: status 1, or
-- -1 when the target generation is no longer the current or next one (lost or replaced).

local function add(p, first)
  local new = 0
  if p.backend == "bf" then
    local r = redis.call("BF.MADD", p.keys[1], unpack(ARGV, first))
    for i = 1, #r do
      new = new + r[i]
    end
  else
    local m, size, keys, k = p.m, p.size, p.keys, p.k
    for j = first, #ARGV do
      local h = redis.sha1hex(ARGV[j])
      local a = tonumber(string.sub(h, 1, 12), 16) % m
      local b = tonumber(string.sub(h, 13, 24), 16) % m
      if b == 0 then
        b = 1
      end
      local fresh = 0
      for i = 0, k - 1 do
        local pos = (a + i * b) % m
        local part = math.floor(pos / size)
        if redis.call("SETBIT", keys[part + 1], tostring(pos - part * size), "1") == 0 then
          fresh = 1
        end
      end
      new = new + fresh
    end
  end
  if new > 0 then
    redis.call("HINCRBY", META, "n:" .. p.g, tostring(new))
  end
  return new
end

local FIRST = 9
local cur, nxt, complete = ensure(read_spec(2))

local target = ARGV[1]
local new = 0
if #ARGV >= FIRST then
  if target == "" then
    new = add(cur, FIRST)
    if nxt then
      add(nxt, FIRST)
    end
  elseif target == cur.g then
    new = add(cur, FIRST)
  elseif nxt and target == nxt.g then
    new = add(nxt, FIRST)
  else
    return { -1, cur.g, complete, 0 }
  end
elseif target ~= "" and target ~= cur.g and not (nxt and target == nxt.g) then
  return { -1, cur.g, complete, 0 }
end
return { 1, cur.g, complete, new }
