-- Coroutines used from metamethods and sort comparators (C calls, where a coroutine cannot
-- pass a yield on), and long work inside them.
return function()
  local function weight(x)
    local gen = coroutine.wrap(function()
      local s = 0
      for i = 1, 50 do s = s + (x * i) % 13 coroutine.yield(s) end
    end)
    local last
    for _ = 1, 50 do last = gen() end
    return last
  end
  local items = {}
  for i = 1, 60 do items[i] = (i * 7919) % 61 end
  table.sort(items, function(a, b)
    local wa, wb = weight(a), weight(b)
    if wa ~= wb then return wa < wb end
    return a < b
  end)
  local lazy = setmetatable({}, { __index = function(_, k)
    local co = coroutine.create(function() local s = 0 for i = 1, 400 do s = s + i * k end return s end)
    local _, v = coroutine.resume(co)
    return v
  end })
  local replaced = string.gsub("a b c", "%a", function(c)
    return coroutine.wrap(function() local n = 0 for i = 1, 300 do n = n + 1 end return c .. n end)()
  end)
  return table.concat(items, ",") .. " " .. lazy[3] .. " " .. lazy[5] .. " " .. replaced
end
