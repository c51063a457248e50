-- wrk script for bench/poll_server.py: POST /poll, each request as another endpoint.
--
-- Serials come from a pool (EP00000000 …), so every poll is a real endpoint
-- write; even serials run the target version (noUpdate up-to-date), odd ones
-- an older one (an update offer). Settings come from the environment:
--   POLL_POOL      endpoints in the pool (10000)
--   POLL_STRIDE    distance between pooled serials (1), to spread them over
--                  a big pre-filled table
--   POLL_DELAY_MS  mean think time between a connection's polls, exponential
--                  (unset: none, full speed)
--   POLL_TARGET / POLL_OLD   the two versions sent
--   POLL_NEW       a third version, sent by every tenth serial (unset: none);
--                  poll_server.py --rollout sends the rollout's version
--
--   POLL_POOL=10000 wrk -t1 -c16 -d10s --latency -s bench/poll.lua https://127.0.0.1:8443/poll

local pool = tonumber(os.getenv("POLL_POOL") or "10000")
local stride = tonumber(os.getenv("POLL_STRIDE") or "1")
local delay_ms = tonumber(os.getenv("POLL_DELAY_MS") or "0")
local versions = {
  [0] = os.getenv("POLL_TARGET") or "6.2.2.0-100",
  [1] = os.getenv("POLL_OLD") or "6.2.1.1-600021",
}
local newest = os.getenv("POLL_NEW")
local headers = { ["Content-Type"] = "application/xml" }
local template = '<poll protocol="1"><endpoint serial="EP%08d" type="GroupSeries"'
  .. ' version="%s" model="RealPresence Group 500" in-call="false"/></poll>'

local threads = 0
local n = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  n = (tid or 0) * 7919 -- threads start apart in the pool
  math.randomseed(4242 + (tid or 0))
end

function request()
  n = n + 1
  local i = n % pool
  local version = versions[i % 2]
  if newest and i % 10 == 0 then
    version = newest
  end
  local body = string.format(template, i * stride, version)
  return wrk.format("POST", "/poll", headers, body)
end

-- wrk decides at load time whether the script has a delay(): define it only
-- when pacing, so full-speed runs pay nothing for it.
if delay_ms > 0 then
  function delay()
    -- exponential think time with mean delay_ms, dithered to whole milliseconds
    return math.floor(-math.log(1 - math.random()) * delay_ms + math.random())
  end
end
