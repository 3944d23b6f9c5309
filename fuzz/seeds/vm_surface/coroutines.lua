--lua coroutine.* in odd orders
v0 = coroutine.create(function(...) local a = coroutine.yield(...) error(a) end)
v1 = {coroutine.resume(v0, 1, 2)}
v1 = {coroutine.resume(v0, {})}
v1 = {coroutine.resume(v0)}
v1 = coroutine.status(v0)
v1 = {coroutine.close(v0)}
v1 = {coroutine.resume(coroutine.running())}
v1 = {coroutine.close(coroutine.running())}
v2 = coroutine.wrap(function() v2() end); v2()
v2 = coroutine.create(function() return coroutine.close(v2) end); coroutine.resume(v2)
v2 = coroutine.create(function() coroutine.resume(v2) end); coroutine.resume(v2)
v3 = coroutine.wrap(function(...) for i = 1, 3 do coroutine.yield(i) end end); v3(); v3(); v3(); v3(); v3()
v3 = coroutine.create(function() coroutine.yield() end); coroutine.resume(v3); coroutine.close(v3); coroutine.resume(v3)
v4 = coroutine.create(function() local t = setmetatable({}, {__index = function() return coroutine.yield(1) end}) return t.x end); v1 = {coroutine.resume(v4)}; v1 = {coroutine.resume(v4, 2)}
v4 = coroutine.create(function() table.sort({3, 2, 1}, function(a, b) coroutine.yield() return a < b end) end); v1 = {coroutine.resume(v4)}
v4 = coroutine.create(function() pcall(coroutine.yield, 1) error('after') end); coroutine.resume(v4); v1 = {coroutine.resume(v4)}; v1 = {coroutine.close(v4)}
v5 = coroutine.create(print); coroutine.resume(v5, coroutine.isyieldable())
v5 = coroutine.create(coroutine.yield); coroutine.resume(v5, 1); coroutine.resume(v5, 2)
v5 = coroutine.wrap(error); v5('x')
v5 = coroutine.wrap(coroutine.wrap); v5(print)
v6 = {}; for i = 1, 200 do v6[i] = coroutine.create(function() coroutine.yield(i) end); coroutine.resume(v6[i]) end
local co = coroutine.running(); v7 = coroutine.wrap(function() return coroutine.resume(co) end)()
coroutine.yield(1, 2)
local n = 0; local function deep() n += 1; local c = coroutine.wrap(deep); return c() end; deep()
for i, sq in coroutine.wrap(function() for i = 1, 5 do coroutine.yield(i, i * i) end end) do v0 = sq end
