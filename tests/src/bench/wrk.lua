-- The bench's wrk script: counts the responses by status, which done() prints after wrk's report as
-- `status <code> <count>` lines (wrk itself only counts those of 400 and above, all together). wrk
-- still sends its own prepared request: no Lua runs per request but the counting.

-- Global: done() reads each thread's through thread:get.
statuses = {}

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
         io.write(string.format("status %d %d\n", status, count))
      end
   end
end
