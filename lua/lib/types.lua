-- key_type: a key's Redis type as a string ("none" when missing). Real Redis answers TYPE with a
-- status table ({ok = "list"}) while fakeredis answers a plain string; both are accepted.
local function key_type(key)
  local t = redis.call("TYPE", key)
  if type(t) == "table" then
    return t.ok
  end
  return t
end

-- first_wrong_type: given {key1, type1, key2, type2, ...}, the first key that exists with another
-- type, or nil. Scripts call it before their first write so corrupt state never gets a partial write.
local function first_wrong_type(pairs_list)
  for i = 1, #pairs_list, 2 do
    local t = key_type(pairs_list[i])
    if t ~= "none" and t ~= pairs_list[i + 1] then
      return pairs_list[i]
    end
  end
  return nil
end
