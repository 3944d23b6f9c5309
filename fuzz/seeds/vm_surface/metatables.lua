--lua setmetatable with odd metamethods; select; pcall/error with odd values; string metatable
v0 = setmetatable({}, {__index = function(t, k) return t[k] end}); v1 = v0.x
v0 = setmetatable({}, {__newindex = function(t, k, v) t[k] = v end}); v0.x = 1
v0 = setmetatable({}, {__index = setmetatable({}, {__index = function(t, k) error(k) end})}); v1 = v0[0/0]
v0 = setmetatable({}, {__call = function(self, ...) return select('#', ...) end}); v1 = v0(nil, nil)
v0 = setmetatable({}, {__call = v0}); v1 = v0()
v0 = setmetatable({}, {__len = function() return 0/0 end}); v1 = #v0
v0 = setmetatable({}, {__len = function() return 'x' end}); v1 = table.insert(v0, 1)
v0 = setmetatable({}, {__concat = function(a, b) return a end}); v1 = v0 .. 'x' .. v0
v0 = setmetatable({}, {__eq = function() error('eq') end}); v1 = v0 == setmetatable({}, getmetatable(v0))
v0 = setmetatable({}, {__iter = function(t) return next, {1, 2, 3} end}); for k, v in v0 do v1 = v end
v0 = setmetatable({}, {__iter = function(t) return 1 end}); for k, v in v0 do v1 = v end
v0 = setmetatable({}, {__tostring = function() return v0 end}); v1 = tostring(v0)
v0 = setmetatable({}, {__metatable = false}); v1 = getmetatable(v0); setmetatable(v0, {})
v0 = setmetatable({}, {__mode = 'kv'}); v0[{}] = {}; v0[1] = {}
v0 = setmetatable({}, {__index = string}); v1 = v0.rep('x', 3)
v1 = getmetatable('').__index.rep('x', 2)
getmetatable('').__index = {}
v1 = ('abc'):len() + #'abc' + ('x'):rep(3):len()
v1 = ('abc')[1]
v1 = ('abc').len
v1 = (5):rep(2)
v1 = {select(-1, 1, 2, 3)}
v1 = {select(-4, 1, 2, 3)}
v1 = {select(2^31, 1, 2, 3)}
v1 = {select(-2^31, 1, 2, 3)}
v1 = {select(0, 1)}
v1 = {select(0/0, 1)}
v1 = select('#', table.unpack(table.create(7999, 1)))
v1 = {pcall(error)}
v1 = {pcall(error, nil)}
v1 = {pcall(error, setmetatable({}, {__tostring = function() error('nested') end}))}
v1 = {pcall(error, 'x', 2^31)}
v1 = {pcall(error, 'x', -1)}
v1 = {xpcall(error, error)}
v1 = {xpcall(function() error('x') end, function(m) error(m) end)}
v1 = {xpcall(function() local function f() return f() + 1 end return f() end, function(m) return m end)}
v1 = {pcall(pcall, pcall, pcall, error, {})}
v1 = {pcall(setmetatable, 1, {})}
v1 = {pcall(rawset, table.freeze({}), 1, 2)}
v1 = {pcall(rawlen, 1)}
v1 = newproxy(true); getmetatable(v1).__index = function() return 1 end; v2 = v1.x
v1 = {pcall(getfenv, 2^31)}
v1 = {pcall(setfenv, 2, {})}
v1 = loadstring(string.rep('(', 300) .. '1' .. string.rep(')', 300))
v1 = loadstring('return ...', string.rep('x', 1000))
v1 = load(function() return nil end)
v1 = {load('\27Lua')}
v1 = gcinfo()
