-- One refresh, atomically, on one family's hash slot. Mirrors Record::step in mod.rs.
-- KEYS[1]  the family hash
-- ARGV[1]  hash of the presented token      ARGV[2]  client id of the caller
-- ARGV[3]  now (Unix ms)                    ARGV[4]  reuse grace (ms)
-- ARGV[5]  idle expiry after a rotation     ARGV[6]  hash of the candidate successor
-- ARGV[7]  candidate successor, wrapped     ARGV[8]  GC margin for the key TTL (ms)
-- Returns {status, reason, fields}: status 'invalid' (reason unknown|client|expired),
-- 'rotated' or 'replay' (fields = HGETALL after the step), 'reused' (fields = sub, client).
local f = redis.call('HMGET', KEYS[1], 'client', 'abs_exp', 'idle_exp', 'cur', 'prev', 'rotated_at', 'sub')
if not f[1] then
  return {'invalid', 'unknown', {}}
end
if f[1] ~= ARGV[2] then
  -- another client's token: refuse, change nothing
  return {'invalid', 'client', {}}
end
local now = tonumber(ARGV[3])
local abs_exp = tonumber(f[2])
if now >= abs_exp or now >= tonumber(f[3]) then
  return {'invalid', 'expired', {}}
end
if f[4] == ARGV[1] then
  local idle_exp = tonumber(ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  redis.call('HSET', KEYS[1], 'cur', ARGV[6], 'prev', ARGV[1], 'wrap', ARGV[7],
    'rotated_at', ARGV[3], 'last_used', ARGV[3], 'idle_exp', ARGV[5])
  local ttl = math.max(math.min(abs_exp, idle_exp) - now, 0) + tonumber(ARGV[8])
  redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl))
  return {'rotated', '', redis.call('HGETALL', KEYS[1])}
end
if f[5] and f[5] ~= '' and f[5] == ARGV[1] and now - tonumber(f[6]) <= tonumber(ARGV[4]) then
  -- the token rotated a moment ago (another tab): hand back the same successor
  return {'replay', '', redis.call('HGETALL', KEYS[1])}
end
-- a genuine (tag-checked) token of this family that is no longer current: re-use
redis.call('DEL', KEYS[1])
return {'reused', '', {'sub', f[7], 'client', f[1]}}
