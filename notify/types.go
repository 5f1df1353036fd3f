// Package notify tells people what happened in the fleet: webhook
// subscriptions on event types, and their delivery.
//
// What happened is written to a transactional outbox (the notifications
// table) by the transaction that made the change: database triggers on the
// campaign audit trail and on the verdict history, the analysis' own
// compatibility update, and Publish for the rest. An insert there fans out
// to a delivery per subscribed webhook in the same statement, so nothing
// that committed can be lost, and a change made on any replica is told
// once. Every replica runs a Deliverer; deliveries are claimed with FOR
// UPDATE SKIP LOCKED, so each attempt is made by one replica.
package notify

import (
	"fmt"
	"slices"
	"strings"
)

// Type is a notification type, the name subscriptions list.
type Type string

// The notification types. Campaign types come from the campaign audit
// trail, firmware types from the learned verdicts' history, devices.
// incompatible from the analysis, devices.offline and model types from
// the offline watch, recorder types from each replica's
// recorder, webhook.disabled from the deliverer itself.
const (
	CampaignPausedByGate     Type = "campaign.paused_by_gate"
	CampaignAbortedByGate    Type = "campaign.aborted_by_gate"
	CampaignAwaitingApproval Type = "campaign.awaiting_approval"
	CampaignCompleted        Type = "campaign.completed"
	CampaignAborted          Type = "campaign.aborted"
	CampaignRolledBack       Type = "campaign.rolled_back"
	FirmwareFlagged          Type = "firmware.flagged"
	FirmwareCleared          Type = "firmware.cleared"
	DevicesIncompatible      Type = "devices.incompatible"
	DevicesOffline           Type = "devices.offline"
	ModelOffline             Type = "model.offline"
	ModelBackOnline          Type = "model.back_online"
	RecorderBehind           Type = "recorder.behind"
	RecorderCaughtUp         Type = "recorder.caught_up"
	WebhookDisabled          Type = "webhook.disabled"
	// WebhookTest is sent by POST /api/v1/webhooks/{id}/test to that
	// subscription only; it is not a type a subscription lists.
	WebhookTest Type = "webhook.test"
)

// TypeInfo describes a notification type for the API and the console.
type TypeInfo struct {
	Type        Type   `json:"type"`
	Description string `json:"description"`
}

// Types lists every notification type a subscription may name.
var Types = []TypeInfo{
	{CampaignPausedByGate, "a health gate breached and paused a campaign (data: campaign_id, name, state, stage, version, reason, gate with its numbers)"},
	{CampaignAbortedByGate, "a health gate breached and aborted a campaign (gate_action abort)"},
	{CampaignAwaitingApproval, "a campaign's next stage requires an operator's approval and waits for it (data: stage, the stage it waits to start)"},
	{CampaignCompleted, "a campaign's last stage passed its gates"},
	{CampaignAborted, "an operator aborted a campaign (data: actor)"},
	{CampaignRolledBack, "every rollback job of a campaign finished"},
	{FirmwareFlagged, "the analysis flagged a firmware (data: model, firmware, flag, rate, baseline)"},
	{FirmwareCleared, "a flag of a firmware was cleared"},
	{DevicesIncompatible, "devices became incompatible, one notification per model and firmware per analysis round (data: model, firmware, devices, sample)"},
	{DevicesOffline, "devices went offline and stayed so longer than -notify-offline-after: one notification per model per round of the watch (data: model, devices, sample, offline_after_s)"},
	{ModelOffline, "the share of a model's active devices offline longer than -notify-offline-after reached -notify-model-offline-share (data: model, offline, devices, share)"},
	{ModelBackOnline, "that share fell below the threshold again"},
	{RecorderBehind, "a replica's recorder fell behind: connection events wait for the database longer than -recorder-behind-after (data: node, oldest_age_s)"},
	{RecorderCaughtUp, "a replica's recorder caught up again"},
	{WebhookDisabled, "a webhook subscription was disabled after failing deliveries in a row (data: subscription_id, url, failures)"},
}

// Known reports whether t is a notification type.
func Known(t Type) bool {
	return slices.ContainsFunc(Types, func(i TypeInfo) bool { return i.Type == t })
}

func typeNames() string {
	names := make([]string, len(Types))
	for i, t := range Types {
		names[i] = string(t.Type)
	}
	return strings.Join(names, ", ")
}

// ValidationError names the request field that is wrong.
type ValidationError struct {
	Field string
	Msg   string
}

func (e *ValidationError) Error() string { return fmt.Sprintf("%s: %s", e.Field, e.Msg) }

// FieldName is the field the error is about (web.FieldError).
func (e *ValidationError) FieldName() string { return e.Field }
