-- Give up a fill lease, only if it is still ours (a later holder's lease is left alone).
--
-- KEYS[1] fill lease; ARGV[1] lease token. Returns 1 if released, else 0.

if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
