-- The bench's wrk script: counts the responses by status, which done() prints after wrk's report as
-- `status <code> <count>` lines (wrk itself only counts those of 400 and above, all together). Its
-- arguments, after wrk's `--`, choose the requests:
--   url                   the load's URL again and again, as fast as the server answers (wrk's own
--                         prepared request: no Lua runs per request but the counting)
--   sdk <pause ms> <v1|v2>
--                         what an SDK asks for credentials, the load's URL being a role's: the role list
--                         (the URL's directory) and the role's credentials in turn, with v2 an IMDSv2
--                         token first and a new one every TOKEN_EVERY requests; each connection pauses
--                         before its next request, which sets the rate

-- Global: done() reads each thread's through thread:get.
statuses = {}

local TOKEN_EVERY = 100
local threads = {}
local pause_ms, v2, role_list
local token
local sent = 0

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   if args[1] == "sdk" then
      pause_ms, v2 = tonumber(args[2]), args[3] == "v2"
      role_list = wrk.path:match("^(.*/)")
   else
      -- wrk checks for these after init: without them it sends its prepared request without pause.
      request = nil
      delay = nil
   end
end

function delay()
   return pause_ms
end

-- wrk's headers (the command line's, such as `Connection: close`) and `extra`.
local function headers_with(extra)
   local headers = {}
   for name, value in pairs(wrk.headers) do
      headers[name] = value
   end
   for name, value in pairs(extra) do
      headers[name] = value
   end
   return headers
end

function request()
   sent = sent + 1
   if v2 and (token == nil or sent % TOKEN_EVERY == 0) then
      local ttl = { ["X-aws-ec2-metadata-token-ttl-seconds"] = "21600" }
      return wrk.format("PUT", "/latest/api/token", headers_with(ttl))
   end
   local headers = headers_with(token and { ["X-aws-ec2-metadata-token"] = token } or {})
   if sent % 2 == 0 then
      return wrk.format("GET", role_list, headers)
   end
   return wrk.format("GET", wrk.path, headers)
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   -- Only a token response carries its TTL back.
   if status == 200 and headers["x-aws-ec2-metadata-token-ttl-seconds"] then
      token = body
   end
end

function done(summary, latency, requests)
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
         io.write(string.format("status %d %d\n", status, count))
      end
   end
end
