--lua a mix: varargs, interpolation, integer division, compound assignment, recursion
v0 = `{1}{'a'}{nil}{{}}`
v0 = `{setmetatable({}, {__tostring = function() error('t') end})}`
v1 = 0; for i = 2^31 - 3, 2^31 + 3 do v1 += i end
v1 = 0; for i = -0.0, 1, 0.25 do v1 += i end
for i = 1, 0/0 do v1 = i end
for i = 1, 10, 0 do v1 = i break end
v1 ..= 'x'
v1 //= 0
v2 = {...}; v2 = select('#', ...)
local function f(n, ...) if n > 0 then return f(n - 1, n, ...) end return select('#', ...) end v3 = f(7000)
local function g() return g() end g()
local function h(...) return h(..., ...) end h(1)
v4 = string.rep('x', 2^22) .. string.rep('y', 2^22) .. string.rep('z', 2^23)
v4 = table.concat(table.create(2^16, 'abcdefgh'))
v5 = {}; for i = 1, 1e4 do v5[i] = i end
v5 = nil; v6 = setmetatable({}, {__index = function(t, k) return k < 2^31 and t[k * 2] or k end})[1]
v7 = if v0 then #v0 else -1
