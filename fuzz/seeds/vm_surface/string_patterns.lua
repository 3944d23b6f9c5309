--lua string patterns: nested captures, %b, %f, position captures, back-references
v0 = string.rep('(a[b]c)', 50)
v1 = {string.find(v0, '((%b())(%b[]))')}
v1 = {string.match(v0, '(((((((((((((((((((((((((((((((((a)))))))))))))))))))))))))))))))))')}
v1 = {string.match('hello world', '()(%w+)()%s*()')}
v1 = {string.find('THE (quick) fox', '%f[%a]%a+%f[%A]', -2147483648)}
v1 = {string.find('abc', '%f[%z]', 2147483647)}
v1 = string.gsub(v0, '%b()', '%0%0', 2^31)
v1 = string.gsub('abc', '', '-')
v1 = string.gsub('abc', '(a)(b)(c)', '%4')
v1 = string.gsub('abc', '.', {a = 1, b = true, c = {}})
v1 = string.gsub('abc', '.', function(c) return nil end, -1)
v1 = string.gsub(string.rep('a', 1e3), 'a*', '%0')
v1 = string.match(string.rep('a', 10), string.rep('a*', 5) .. 'b')
v1 = string.find('a', '%')
v1 = string.find('a', '[a')
v1 = string.find('a', '[^]')
v1 = string.find('a', '(()')
v1 = string.find('a', '%1')
v1 = string.find('aaa', '(a)%1', 0/0)
for w in string.gmatch('one two  three', '%a*') do v2 = (v2 or '') .. w end
for a, b in string.gmatch(v0, '()(%b())') do v3 = a end
v1 = ('x'):rep(10):gsub('x', '%%')
v1 = string.split('a,b,,c', '')
v1 = string.split(string.rep(',', 1000), ',')
v1 = string.find('abc', 'b', -2^53, true)
