-- The legitimate cousin of the hostile spin: a wrapped coroutine that computes for many
-- slices and returns its answer (it used to return at once, with nothing).
return function()
  local f = coroutine.wrap(function(n)
    local s = 0
    for i = 1, n do s = (s + i * i) % 1000000007 end
    return "done " .. s
  end)
  return f(20000)
end
