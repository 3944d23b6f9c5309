--lua string.format, rep, sub, byte, char, pack/unpack at the edges
v0 = string.format('%99.99f', -1e308)
v0 = string.format('%5.2s|%-10d|%+i|% d|%#x|%o', 'abc', 2^31, -2^31, 0/0, 2^53, -1)
v0 = string.format('%q', '\0\1\255"\\\n' .. string.rep('x', 10))
v0 = string.format('%q', 0/0)
v0 = string.format('%q', -0.0)
v0 = string.format('%c%c%c', 0, 255, 256)
v0 = string.format('%d', 2^63)
v0 = string.format('%x', -1)
v0 = string.format('%a %A %g %G %e %E', 1e-310, math.huge, -0.0, 2^-1074, 1e308, 0/0)
v0 = string.format('%*')
v0 = string.format('%100d', 1)
v0 = string.format('%.100f', 1)
v0 = string.format('%s %s %s', setmetatable({}, {__tostring = function() return {} end}), nil)
v0 = string.format('%s', setmetatable({}, {__tostring = function() error('x') end}))
v0 = string.format(string.rep('%s', 200), table.unpack(table.create(200, 'x')))
v1 = string.rep('ab', 2^31)
v1 = string.rep('', 2^53)
v1 = string.rep('x', 1e7, ', ')
v1 = string.rep('x', -2^31)
v1 = string.sub('hello', -2^31, 2^31)
v1 = string.sub('hello', 2^53, -2^53)
v1 = string.sub('hello', 0/0, math.huge)
v1 = {string.byte('hello', -2147483648, 2147483647)}
v1 = {string.byte(string.rep('x', 100000), 1, -1)}
v1 = string.char(0, 255, 256)
v1 = string.char(-1)
v1 = string.char(table.unpack(table.create(10000, 65)))
v2 = string.pack('<i4 >I8 z s1 d n j', -2^31, 2^53, 'abc', 'x', 0/0, math.huge, -1)
v2 = {string.unpack('<i4 >I8 z s1 d n j', v2)}
v2 = string.pack('i16', 1)
v2 = string.pack('!16 i3 Xi16', 1)
v2 = string.pack('s4', string.rep('x', 100))
v2 = string.packsize('c2147483647c2147483647')
v2 = {string.unpack('z', 'abc', 2147483647)}
v2 = {string.unpack('s4', '\255\255\255\127', 1)}
v2 = {string.unpack('i4', 'abcd', -2^31)}
v2 = string.pack('c10', string.rep('y', 20))
v2 = string.pack('=!1 b B h H l L', 127, 255, 32767, 65535, 2^63, -1)
v2 = {string.unpack('Xi4 i2', '\0\0\0\0\1\0')}
