-- Give up a fill lease, only if it is still ours (a later holder's lease, or a value written
-- since, is left alone).
--
-- KEYS[1] the entry key; ARGV[1] our lease envelope as stored. Returns 1 if released, else 0.

if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
