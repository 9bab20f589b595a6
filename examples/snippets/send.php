<?php
// The API document's PHP example, against CALLCAP_URL with CALLCAP_API_KEY and
// CALLCAP_COMPANY_ID. No library: a 503 or a lost connection is the caller's to retry.

$endpoint = getenv('CALLCAP_URL') . '/functions/v1/webhook-call-capture';
$apiKey = getenv('CALLCAP_API_KEY');

$callData = [
    'company_id' => getenv('CALLCAP_COMPANY_ID'),
    'caller_number' => '+919876543210',
    'recipient_number' => '+919123456789',
    'duration_seconds' => 180,
    'outcome' => 'follow_up',
    'notes' => 'Customer interested in service',
    'call_date' => gmdate('Y-m-d\TH:i:s\Z'),
    'external_call_id' => 'CALL-12345'
];

$ch = curl_init($endpoint);
curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);
curl_setopt($ch, CURLOPT_POST, true);
curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode($callData));
curl_setopt($ch, CURLOPT_HTTPHEADER, [
    'Content-Type: application/json',
    'x-api-key: ' . $apiKey
]);

$response = curl_exec($ch);
$httpCode = curl_getinfo($ch, CURLINFO_HTTP_CODE);
curl_close($ch);

$result = json_decode($response, true);

if ($httpCode === 201) {
    echo "Success! Call ID: " . $result['data']['call_history_id'] . "\n";
} else {
    echo "Error: " . ($result['message'] ?? 'Unknown error') . "\n";
    exit(1);
}
