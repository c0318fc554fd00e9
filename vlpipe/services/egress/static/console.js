// The vlpipe web console: talk to the pipeline through the gateway's /v1/call socket.
// Microphone audio goes out as 24 kHz PCM16 in 20 ms messages (the upstream's own input
// format, so the gateway announces it as direct input and it skips ingest); the assistant's audio comes
// back as 24 kHz PCM16 and is played in order; both sides' transcripts and the session's
// status show live. Each call gets its session and call token from the server that serves
// this page (/console/session), as an app's page gets one from its backend; the token
// travels as the WebSocket subprotocol `vlpipe.bearer.<token>`, never in the URL.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { ws: null, mic: null, capture: null, player: null, items: new Map(), played: 0 };

// Collects the 128-sample render quanta into 20 ms messages (480 samples at 24 kHz): one
// message per quantum would be 125 messages a second.
const CAPTURE_WORKLET = `
class Capture extends AudioWorkletProcessor {
  constructor() { super(); this.pcm = new Int16Array(480); this.filled = 0; }
  process(inputs) {
    const channel = inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.pcm[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.filled === this.pcm.length) {
          this.port.postMessage(this.pcm.buffer, [this.pcm.buffer]);
          this.pcm = new Int16Array(480);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("capture", Capture);`;

function setState(text) { $("state").textContent = text; }

function addStatus(text, error) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (error) li.className = "error";
  $("status").prepend(li);
}

function showTranscript(piece) {
  let li = state.items.get(piece.item_id);
  if (!li) {
    li = document.createElement("li");
    li.innerHTML = "<b></b><span></span>";
    state.items.set(piece.item_id, li);
    $("transcript").append(li);
  }
  const interrupted = li.classList.contains("interrupted") ? " interrupted" : "";
  li.className = `${piece.speaker}${piece.final ? "" : " partial"}${interrupted}`;
  li.dataset.final = piece.final ? "1" : "0";
  li.querySelector("b").textContent = piece.speaker;
  li.querySelector("span").textContent = piece.text;
  li.scrollIntoView({ block: "nearest" });
}

function markInterrupted(itemId) {
  // The assistant was cut off: its words past this point were never heard.
  const li = itemId && state.items.get(itemId);
  if (li) li.classList.add("interrupted");
}

class Player {
  // Plays PCM16 chunks back to back; `clear()` stops at once (barge-in).
  constructor(rate) {
    this.ctx = new AudioContext({ sampleRate: rate });
    this.rate = rate;
    this.next = 0;
    this.sources = [];
    this.response = null;
    this.responseStart = 0;
  }
  play(buffer, response) {
    const pcm = new Int16Array(buffer);
    if (!pcm.length) return;
    const audio = this.ctx.createBuffer(1, pcm.length, this.rate);
    const data = audio.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 0x8000;
    const source = this.ctx.createBufferSource();
    source.buffer = audio;
    source.connect(this.ctx.destination);
    const at = Math.max(this.ctx.currentTime + 0.05, this.next);
    if (response !== this.response) { this.response = response; this.responseStart = at; }
    source.start(at);
    this.next = at + audio.duration;
    this.sources.push(source);
    source.onended = () => {
      this.sources = this.sources.filter((s) => s !== source);
      state.played += audio.duration;
      $("played").textContent = `${state.played.toFixed(1)} s`;
    };
  }
  playedMs() { return Math.max(0, (this.ctx.currentTime - this.responseStart) * 1000); }
  clear() {
    for (const s of this.sources) { try { s.stop(); } catch (e) { /* already ended */ } }
    this.sources = [];
    this.next = 0;
  }
}

async function start() {
  $("start").disabled = true;
  let call;
  try {
    const reply = await fetch("/console/session", { cache: "no-store" });
    if (!reply.ok) throw new Error(`${reply.status} ${await reply.text()}`);
    call = await reply.json();
  } catch (err) {
    addStatus(`no call token: ${err.message}`, true);
    $("start").disabled = false;
    return;
  }
  const params = new URLSearchParams({ session: call.session, input: "pcm16", rate: "24000", format: "pcm16" });
  if ($("instructions").value) params.set("instructions", $("instructions").value);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/call?${params}`, ["vlpipe", `vlpipe.bearer.${call.token}`]);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  state.player = new Player(24000);
  let currentResponse = null;
  let reporter = null;

  ws.onopen = async () => {
    setState("connecting the microphone");
    try {
      state.mic = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    } catch (err) {
      addStatus(`no microphone: ${err.message}`, true);
      ws.close();
      return;
    }
    state.capture = new AudioContext({ sampleRate: 24000 });
    const url = URL.createObjectURL(new Blob([CAPTURE_WORKLET], { type: "text/javascript" }));
    await state.capture.audioWorklet.addModule(url);
    const node = new AudioWorkletNode(state.capture, "capture");
    node.port.onmessage = (e) => { if (ws.readyState === WebSocket.OPEN) ws.send(e.data); };
    state.capture.createMediaStreamSource(state.mic).connect(node);
    setState("listening");
    $("stop").disabled = false;
    reporter = setInterval(() => {
      if (currentResponse && ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "played", response_id: currentResponse, ms: state.player.playedMs() }));
      }
    }, 250);
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") { state.player.play(e.data, currentResponse); return; }
    const msg = JSON.parse(e.data);
    if (msg.type === "session") { $("session").textContent = msg.session; }
    else if (msg.type === "transcript") {
      showTranscript(msg);
      if (msg.speaker === "assistant" && msg.response_id) currentResponse = msg.response_id;
    }
    else if (msg.type === "audio.clear") { state.player.clear(); addStatus("interrupted: playback cleared"); }
    else if (msg.type === "audio.end") { addStatus(`response ${msg.response_id} complete`); }
    else if (msg.type === "status") {
      if (msg.kind === "latency") {
        $("latency").textContent = `${Math.round(msg.detail.ms)} ms`;
        currentResponse = msg.detail.response_id;
      }
      if (msg.kind === "interrupted") markInterrupted(msg.detail.item_id);
      addStatus(`${msg.service} ${msg.kind}: ${msg.message}`, msg.kind === "error");
      if (msg.kind === "state") setState(msg.message);
    }
    else if (msg.type === "notice" || msg.type === "error") { addStatus(msg.message, msg.type === "error"); }
  };
  ws.onclose = (e) => {
    clearInterval(reporter);
    setState(e.code === 1000 || e.code === 1005 ? "ended" : `closed (${e.code} ${e.reason})`);
    stopAudio();
    $("start").disabled = false;
    $("stop").disabled = true;
  };
}

function stopAudio() {
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  if (state.capture) state.capture.close();
  state.mic = null;
  state.capture = null;
}

function hangUp() {
  stopAudio();
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "end" }));
  $("stop").disabled = true;
  setState("finishing");
}

$("start").onclick = start;
$("stop").onclick = hangUp;
