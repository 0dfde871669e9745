#!/bin/sh
# An offline stand-in for an AI agent, used by examples/workflows/agent-offline.yaml.
#
# Smithers runs it as a generic `command` agent: the prompt arrives on stdin and the reply goes to
# stdout. SMITHERS_TURN tells which turn of the attempt this is: 0 for the task's prompt, 1 and
# up for repair turns (when the previous reply had no valid result). Like a careless model, it
# answers the first time with something that looks like JSON but is not; asked again, it answers
# with a valid result in a ```json fence. It reports made-up token counts through
# SMITHERS_USAGE_FILE, so `smithers inspect` has usage to show.
prompt=$(cat)
words=$(printf '%s' "$prompt" | wc -w)
echo "fake-agent: turn ${SMITHERS_TURN:-0}, model ${SMITHERS_MODEL:-none}, prompt of $words words" >&2

if [ "${SMITHERS_TURN:-0}" = "0" ]; then
  echo "I read the change. Verdict: {approved: yes, notes: 'small and tested'}"
else
  echo "Sorry, here is the result again:"
  echo '```json'
  echo '{"approved": true, "notes": "The change is small and has tests."}'
  echo '```'
fi

if [ -n "${SMITHERS_USAGE_FILE:-}" ]; then
  printf '{"input_tokens": %d, "output_tokens": %d}\n' "$words" 20 > "$SMITHERS_USAGE_FILE"
fi
