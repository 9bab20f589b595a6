// The API document's JavaScript example (Node 18+ or a browser's fetch), against
// CALLCAP_URL with CALLCAP_API_KEY and CALLCAP_COMPANY_ID. No library: a 503 or a lost
// connection is the caller's to retry (clients/node does that for you).
const callData = {
  company_id: process.env.CALLCAP_COMPANY_ID,
  caller_number: '+919876543210',
  recipient_number: '+919123456789',
  duration_seconds: 180,
  outcome: 'follow_up',
  notes: 'Customer interested in service',
  call_status: 'completed',
  external_call_id: 'CALL-12345',
  external_system: 'YourDialer',
  call_details: { campaign_id: 'CAMP-001', agent_name: 'John Doe', tags: ['premium', 'follow-up-needed'] },
};

const response = await fetch(`${process.env.CALLCAP_URL}/functions/v1/webhook-call-capture`, {
  method: 'POST',
  headers: { 'Content-Type': 'application/json', 'x-api-key': process.env.CALLCAP_API_KEY },
  body: JSON.stringify(callData),
});
const result = await response.json();
if (result.success) {
  console.log('Call recorded with ID:', result.data.call_history_id);
} else {
  console.error('Error:', result.message);
  process.exitCode = 1;
}
