-- Argo CD health check for kubetune.dev/FineTuneJob (the source of the copy in argocd-cm-patch.yaml).
--
--   no status yet, or Pending / Validating / Running / Publishing / Restarting -> Progressing
--   Succeeded -> Healthy        Failed -> Degraded        Suspended -> Suspended
--
-- A status computed for an older metadata.generation (spec.runPolicy.suspend was just flipped
-- and the operator has not acted on it yet) is Progressing, except Succeeded and Failed: those
-- are final, the operator never rewrites them, so their observedGeneration may stay behind.
-- The message is the operator's status.message, with the training step while there is one.
local hs = {}

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the kubetune operator to pick up the job"
  return hs
end

local phase = status.phase
local message = status.message or ""

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "waiting for the kubetune operator to act on generation " .. generation ..
    " (status is of generation " .. observed .. "): " .. phase .. ": " .. message
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
  return hs
end

if phase == "Pending" or phase == "Validating" or phase == "Running" or phase == "Publishing"
    or phase == "Restarting" then
  hs.status = "Progressing"
  hs.message = phase .. ": " .. message
  local progress = status.progress
  if progress ~= nil and progress.step ~= nil and progress.totalSteps ~= nil then
    hs.message = hs.message .. " (step " .. progress.step .. "/" .. progress.totalSteps .. ")"
  end
  return hs
end

hs.status = "Unknown"
hs.message = "unknown phase " .. tostring(phase) .. ": " .. message
return hs
